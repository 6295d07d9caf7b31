#!/usr/bin/env python3
"""Write the CABS conformance vectors (conformance/cabs_conformance/vectors/*.json).

This is an *independent* float64 transcription of the controller and sampler
semantics fixed in ``conformance/README.md`` (which in turn follows
``docs/spec.md``).  It uses only the Python standard library (``math``,
``json``, ``random``) and deliberately imports nothing from ``cabs_core`` or
any array library: the vectors and the project's core are two separate
implementations of the same contract, and the conformance runner checks that
they agree.

Determinism: every synthetic statistic comes from ``random.Random(seed)`` with
a fixed seed per vector, floats are written with ``repr`` (round-trip exact),
keys are sorted, so running the script twice writes the same bytes.

Layout of this file:

* ``splitmix64`` / ``sample_key`` / ``permutation`` / ``sampler_batches`` --
  the sampler.
* ``Controller`` -- the controller: config validation (``validate_config``)
  and one step (``Controller.step``), literally steps 1-10 of the README.
* ``synth_*`` helpers -- realistic synthetic per-step statistics.
* ``build_*`` functions -- one per vector (or family of vectors).
* ``encode`` / ``write_vector`` / ``main`` -- JSON output and final checks.

Run:  ``python conformance/generate_vectors.py [OUT_DIR]``
"""

import json
import math
import os
import random
import sys

FORMAT = "cabs-conformance/1"
TOLERANCE = {"rtol": 1e-12, "atol": 0.0}
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "cabs_conformance", "vectors")

# A finite raw must stay this far (relative) from every k + 1/2.
HALF_MARGIN = 1e-6
# In accepted steps with m >= 2, |S - G2/m| must be at least this fraction of
# S (or exactly 0), so that the clamp decision and the variance do not hinge
# on summation order.
VARIANCE_MARGIN = 1e-5

MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------

def splitmix64(x):
    """One splitmix64 output for input x, all arithmetic mod 2**64."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def sample_key(seed, epoch, i):
    """key(seed, epoch, i) = splitmix64(splitmix64(splitmix64(seed) + epoch) + i)."""
    a = splitmix64(seed & MASK64)
    b = splitmix64((a + epoch) & MASK64)
    return splitmix64((b + i) & MASK64)


def permutation(seed, epoch, n):
    """0..n-1 sorted by ascending key, ties broken by the smaller index."""
    return sorted(range(n), key=lambda i: (sample_key(seed, epoch, i), i))


def shard(indices, world_size):
    """Contiguous split: rank r gets b // w + (1 if r < b % w else 0)."""
    b = len(indices)
    out, start = [], 0
    for r in range(world_size):
        length = b // world_size + (1 if r < b % world_size else 0)
        out.append(indices[start:start + length])
        start += length
    assert start == b
    return out


def sampler_batches(seed, n, world_size, batch_sizes):
    """Expected output of the sampler for a sequence of global batch sizes."""
    perms = {}
    seen = 0
    expect = []
    for b in batch_sizes:
        indices = []
        for p in range(seen, seen + b):
            epoch = p // n
            if epoch not in perms:
                perms[epoch] = permutation(seed, epoch, n)
            indices.append(perms[epoch][p % n])
        seen += b
        expect.append({"indices": indices,
                       "shards": shard(indices, world_size),
                       "examples_seen": seen,
                       "epoch": seen / n})
    return expect


# --------------------------------------------------------------------------
# Controller
# --------------------------------------------------------------------------

CONFIG_KEYS = ("lr", "bs_min", "bs_max", "mu", "c", "eps", "loss_floor",
               "mode", "bs_init", "multiple_of", "buckets", "nonfinite")


class ConfigError(ValueError):
    def __init__(self, argument):
        super().__init__(argument)
        self.argument = argument


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite_number(x):
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x))


def validate_config(cfg):
    """Raise ConfigError(key) for the first invalid key (README table order).

    ``bs_min > bs_max`` is reported as ``bs_max``: bs_min is checked on its
    own (integer >= 1) first, then bs_max (integer >= bs_min).
    """
    assert set(cfg) == set(CONFIG_KEYS), sorted(cfg)
    if not (_is_finite_number(cfg["lr"]) and cfg["lr"] > 0):
        raise ConfigError("lr")
    if not (_is_int(cfg["bs_min"]) and cfg["bs_min"] >= 1):
        raise ConfigError("bs_min")
    if not (_is_int(cfg["bs_max"]) and cfg["bs_max"] >= cfg["bs_min"]):
        raise ConfigError("bs_max")
    lo, hi = cfg["bs_min"], cfg["bs_max"]
    if not (_is_finite_number(cfg["mu"]) and 0 <= cfg["mu"] < 1):
        raise ConfigError("mu")
    if not (_is_finite_number(cfg["c"]) and cfg["c"] > 0):
        raise ConfigError("c")
    if not (_is_finite_number(cfg["eps"]) and cfg["eps"] >= 0):
        raise ConfigError("eps")
    if not _is_finite_number(cfg["loss_floor"]):
        raise ConfigError("loss_floor")
    if cfg["mode"] not in ("paper", "reference"):
        raise ConfigError("mode")
    init = cfg["bs_init"]
    if init is not None and not (_is_int(init) and lo <= init <= hi):
        raise ConfigError("bs_init")
    k = cfg["multiple_of"]
    if k is not None:
        if not (_is_int(k) and k >= 1):
            raise ConfigError("multiple_of")
        if -(-lo // k) * k > hi:  # smallest multiple >= bs_min
            raise ConfigError("multiple_of")
    buckets = cfg["buckets"]
    if buckets is not None:
        if k is not None:
            raise ConfigError("buckets")
        if not (isinstance(buckets, list) and buckets
                and all(_is_int(x) and lo <= x <= hi for x in buckets)
                and all(a < b for a, b in zip(buckets, buckets[1:]))):
            raise ConfigError("buckets")
    if cfg["nonfinite"] not in ("raise", "skip"):
        raise ConfigError("nonfinite")
    if init is not None and discretise_size(cfg, init) != init:
        raise ConfigError("bs_init")  # a first batch no later decision could be


def discretise_size(cfg, b):
    """Step 9 of the README on an integer b already in [bs_min, bs_max]."""
    k, buckets = cfg["multiple_of"], cfg["buckets"]
    if k is not None:
        up = -(-b // k) * k
        return up if up <= cfg["bs_max"] else (cfg["bs_max"] // k) * k
    if buckets is not None:
        above = [x for x in buckets if x >= b]
        return above[0] if above else buckets[-1]
    return b


class NonFiniteError(ValueError):
    def __init__(self, field):
        super().__init__(field)
        self.field = field


class Controller:
    """The README's controller, in plain float64 Python."""

    def __init__(self, cfg):
        validate_config(cfg)
        self.cfg = dict(cfg)
        paper = cfg["mode"] == "paper"
        self.ddof = 1 if paper else 0
        self.step_count = 0
        self.updates = 0
        self.xi_avg = 0.0
        self.loss_avg = 0.0 if paper else 1.0
        first = cfg["bs_init"] if cfg["bs_init"] is not None else cfg["bs_min"]
        self.batch_size = discretise_size(cfg, first)
        self.skipped = 0
        self.clamped = 0
        self.nonfinite = 0

    def copy(self):
        other = Controller.__new__(Controller)
        other.__dict__.update(self.__dict__)
        return other

    def _report(self, skipped, reason, variance, loss, clamped, raw):
        return {"skipped": skipped, "reason": reason, "variance": variance,
                "loss": loss, "clamped": clamped, "raw": raw,
                "batch_size": self.batch_size, "xi_avg": self.xi_avg,
                "loss_avg": self.loss_avg, "updates": self.updates,
                "skipped_total": self.skipped,
                "clamped_total": self.clamped,
                "nonfinite_total": self.nonfinite}

    def _nonfinite(self, field):
        """Step 2's policy for the first bad field: raise, or skip and count."""
        if self.cfg["nonfinite"] == "raise":
            raise NonFiniteError(field)
        self.skipped += 1
        self.nonfinite += 1
        return self._report(True, "nonfinite", None, None, False, None)

    def step(self, stats):
        """Steps 1-10 of the README. Returns the expect dict of the step."""
        cfg = self.cfg
        self.step_count += 1
        m = stats["count"]
        loss_sum = stats["loss_sum"]
        s = stats["sq_norm_sum"]
        g2 = math.fsum(x * x for p in stats["grad_sum"] for x in p)
        bad = [name for name, v in (("count", m), ("loss_sum", loss_sum),
                                    ("sq_norm_sum", s), ("grad_sum", g2))
               if not math.isfinite(v)]
        if bad:
            return self._nonfinite(bad[0])
        if m < 1 or (m < 2 and self.ddof == 1):
            self.skipped += 1
            return self._report(True, "count", None, None, False, None)
        loss = loss_sum / m
        xi = (s - g2 / m) / (m - self.ddof)
        clamped = xi < 0
        if clamped:
            xi = 0.0
        mu = cfg["mu"]
        xi_avg = mu * self.xi_avg + (1 - mu) * xi
        loss_avg = mu * self.loss_avg + (1 - mu) * loss
        updates = self.updates + 1
        if cfg["mode"] == "paper":
            corr = 1 - mu ** updates
            xi_e, loss_e = xi_avg / corr, loss_avg / corr
        else:
            xi_e, loss_e = xi_avg, loss_avg
        d = loss_e - cfg["loss_floor"] + cfg["eps"]
        raw = math.inf if d <= 0 else cfg["c"] * cfg["lr"] * xi_e / d
        # finite statistics whose derived values overflow: step 2's policy
        bad = [name for name, v in (("variance", xi), ("xi_avg", xi_avg), ("loss_avg", loss_avg))
               if not math.isfinite(v)] + (["raw"] if math.isnan(raw) else [])
        if bad:
            return self._nonfinite(bad[0])
        self.clamped += clamped
        self.xi_avg, self.loss_avg, self.updates = xi_avg, loss_avg, updates
        if math.isinf(raw):
            b = cfg["bs_max"]
        else:
            b = min(max(round(raw), cfg["bs_min"]), cfg["bs_max"])
        self.batch_size = discretise_size(cfg, b)
        return self._report(False, None, xi, loss, clamped, raw)


def near_half(raw):
    """True if a finite raw lies within HALF_MARGIN (relative) of k + 1/2."""
    if not math.isfinite(raw):
        return False
    k = math.floor(raw)
    return abs(raw - (k + 0.5)) <= HALF_MARGIN * max(abs(raw), 0.5)


# --------------------------------------------------------------------------
# Synthetic statistics
# --------------------------------------------------------------------------

def short(x, digits=9):
    """x rounded to `digits` significant digits (readable JSON)."""
    return float(f"{x:.{digits}g}")


def sum_sq(grad_sum):
    return math.fsum(x * x for p in grad_sum for x in p)


def make_stats(count, loss_mean, grad_mean, xi_true, ddof_gen=1):
    """Sums for `count` examples with mean loss, mean gradient and a
    within-batch variance xi_true (S = G2/m + (m - ddof_gen) * xi_true)."""
    grad_sum = [[short(count * g) for g in p] for p in grad_mean]
    g2 = sum_sq(grad_sum)
    s = short(g2 / count + max(count - ddof_gen, 0) * xi_true, 12)
    return {"count": count, "loss_sum": short(count * loss_mean, 12),
            "grad_sum": grad_sum, "sq_norm_sum": s}


def loss_curve(t, steps, rng, start=2.3, end=0.1):
    """Mean loss decaying from ~start to ~end, with multiplicative noise."""
    frac = t / max(steps - 1, 1)
    base = end + (start - end) * math.exp(-4.0 * frac)
    return base * math.exp(rng.gauss(0.0, 0.08))


def grad_mean(t, steps, rng, dims):
    """A small mean gradient, per parameter, shrinking over training."""
    scale = 0.3 * math.exp(-2.0 * t / steps) + 0.02
    return [[rng.gauss(0.0, scale) for _ in range(d)] for d in dims]


def raw_target(t, steps, rng, lo, hi, wave=0.35):
    """Intended instantaneous raw (log-linear from lo to hi, a wave, noise)."""
    frac = t / max(steps - 1, 1)
    log_r = math.log(lo) + (math.log(hi) - math.log(lo)) * frac
    log_r += wave * math.log(hi / lo) * math.sin(3.0 * math.pi * frac)
    return math.exp(log_r + rng.gauss(0.0, 0.3))


def next_count(rng, decision, vary):
    """Mostly the previous decision; sometimes a ragged or different batch."""
    if rng.random() < vary:
        return rng.randint(max(2, decision // 2), max(2, decision + decision // 4))
    return decision


def checked_step(ctrl, stats, max_tries=40):
    """Run one step; if a finite raw lands near k + 1/2, perturb loss_sum.

    Returns (stats, expect); `ctrl` is advanced by the accepted attempt.
    """
    for attempt in range(max_tries):
        trial = ctrl.copy()
        if attempt:
            stats = dict(stats)
            stats["loss_sum"] = short(stats["loss_sum"] * (1 + 1e-4 * attempt), 12)
        expect = trial.step(stats)
        if expect["raw"] is None or not near_half(expect["raw"]):
            ctrl.__dict__.update(trial.__dict__)
            return stats, expect
    raise RuntimeError("could not move raw away from a rounding boundary")


# --------------------------------------------------------------------------
# Vector builders
# --------------------------------------------------------------------------

def config(**overrides):
    cfg = {"lr": 0.1, "bs_min": 16, "bs_max": 2048, "mu": 0.95, "c": 1.0,
           "eps": 0.0, "loss_floor": 0.0, "mode": "paper", "bs_init": 16,
           "multiple_of": None, "buckets": None, "nonfinite": "raise"}
    for key, value in overrides.items():
        assert key in cfg, key
        cfg[key] = value
    return cfg


def controller_vector(name, description, cfg, steps, expect_config_error=None):
    return {"format": FORMAT, "kind": "controller", "name": name,
            "description": description, "config": cfg,
            "expect_config_error": expect_config_error,
            "tolerance": dict(TOLERANCE), "steps": steps}


def synthetic_run(cfg, seed, steps, raw_lo, raw_hi, dims=(3, 2, 4), vary=0.2,
                  wave=0.35):
    """A training-like run: loss 2.3 -> 0.1, raw target raw_lo -> raw_hi."""
    rng = random.Random(seed)
    ctrl = Controller(cfg)
    out = []
    for t in range(steps):
        count = next_count(rng, ctrl.batch_size, vary)
        loss = loss_curve(t, steps, rng)
        # Choose xi so that c * lr * xi / (loss - floor + eps) ~ target raw.
        denom = max(loss - cfg["loss_floor"] + cfg["eps"], 1e-3)
        xi = raw_target(t, steps, rng, raw_lo, raw_hi, wave) * denom / (cfg["c"] * cfg["lr"])
        stats = make_stats(count, loss, grad_mean(t, steps, rng, dims), xi)
        stats, expect = checked_step(ctrl, stats)
        out.append({"stats": stats, "expect": expect})
    return out


def decisions(steps):
    return [s["expect"]["batch_size"] for s in steps if "batch_size" in s["expect"]]


def build_main_vectors():
    vectors = []

    def add(name, description, cfg, seed, steps, lo, hi, **kw):
        run = synthetic_run(cfg, seed, steps, lo, hi, **kw)
        vectors.append(controller_vector(name, description, cfg, run))
        return run

    run = add("reference_default",
              "Reference mode (ddof 0, xi_avg starts at 0, loss_avg at 1, no bias "
              "correction) with the reference implementation's defaults: lr 0.1, "
              "bs 16..2048, mu 0.95, first batch 16. Synthetic training run, loss "
              "2.3 -> 0.1; decisions span bs_min to bs_max.",
              config(mode="reference"), 101, 80, 3.0, 9000.0)
    _assert_span(run, 16, 2048)

    run = add("paper_default",
              "Paper mode (ddof 1, both averages start at 0, bias-corrected "
              "avg / (1 - mu^n)), lr 0.1, bs 16..2048, mu 0.95, first batch 16.",
              config(), 102, 80, 3.0, 9000.0)
    _assert_span(run, 16, 2048)

    run = add("paper_floor_eps_c",
              "Paper mode with loss_floor 0.05, eps 1e-3, c 2.0, lr 0.05: "
              "raw = c * lr * xi_e / (L_e - loss_floor + eps).",
              config(loss_floor=0.05, eps=1e-3, c=2.0, lr=0.05), 103, 70, 3.0, 9000.0)
    _assert_span(run, 16, 2048)

    cfg = config(bs_min=10, bs_max=1000, multiple_of=16, bs_init=16)
    run = add("paper_multiple_of",
              "Paper mode, bs 10..1000, multiple_of 16: the clipped decision is "
              "rounded up to a multiple of 16 (10 -> 16), and where that exceeds "
              "bs_max the largest multiple <= bs_max is used (e.g. 1000 -> 992). "
              "multiple_of 16 rather than 8 because 1000 is itself a multiple of 8, "
              "so with 8 that branch could never be taken (see paper_multiple_of_8).",
              cfg, 104, 80, 3.0, 4000.0, vary=0.3)
    ds = decisions(run)
    assert 16 in ds and 992 in ds, ds
    assert any(s["expect"]["raw"] is not None and s["expect"]["raw"] >= 1000
               for s in run)

    cfg = config(bs_min=10, bs_max=1000, multiple_of=8, bs_init=16)
    run = add("paper_multiple_of_8",
              "Paper mode, bs 10..1000, multiple_of 8 (1000 is a multiple of 8, so "
              "every clipped decision rounds up to a multiple <= bs_max; 10 -> 16).",
              cfg, 108, 60, 3.0, 4000.0, vary=0.3)
    ds = decisions(run)
    assert 16 in ds and 1000 in ds, ds

    buckets = [16, 32, 64, 128, 256, 512, 1024, 2048]
    run = add("reference_buckets",
              "Reference mode, buckets [16, 32, ..., 2048]: the smallest bucket >= "
              "the clipped decision.",
              config(mode="reference", buckets=buckets), 105, 80, 3.0, 9000.0)
    ds = decisions(run)
    assert set(ds) <= set(buckets) and 16 in ds and 2048 in ds, ds

    buckets = [16, 24, 48, 100, 300]
    run = add("paper_buckets_partial",
              "Paper mode, bs 16..2048, buckets [16, 24, 48, 100, 300]: decisions "
              "above 300 go to the largest bucket, 300.",
              config(buckets=buckets), 106, 70, 3.0, 3000.0)
    ds = decisions(run)
    assert set(ds) <= set(buckets) and 16 in ds and 300 in ds, ds
    assert any(s["expect"]["raw"] is not None and s["expect"]["raw"] > 300.5
               for s in run)

    run = add("paper_mu_zero",
              "Paper mode with mu 0: no smoothing, the decision follows each "
              "step's own statistics (bias correction 1 - 0^n = 1).",
              config(mu=0.0), 107, 60, 3.0, 9000.0)
    _assert_span(run, 16, 2048)

    run = add("paper_large_lr",
              "Paper mode with lr 1.0: the decision is ten times that of lr 0.1 "
              "for the same statistics, and bs_max is hit often.",
              config(lr=1.0), 109, 60, 10.0, 20000.0)
    _assert_span(run, 16, 2048)
    assert decisions(run).count(2048) >= 10
    return vectors


def _assert_span(run, lo, hi):
    ds = decisions(run)
    assert lo in ds and hi in ds, (min(ds), max(ds))
    assert len(set(ds)) >= 10, ds


def dyadic_grad(rng, dims, scale=1):
    """Gradient entries that are small dyadic rationals (exact squares/sums)."""
    return [[rng.randint(-8, 8) * 0.125 * scale for _ in range(d)] for d in dims]


def tiny_batch_stats(count, rng, dims, loss_sum):
    """Statistics of a batch of 0 examples (all zero) or of 1 example with a
    dyadic gradient, so that S - G2 is exactly 0."""
    if count == 0:
        return {"count": 0, "loss_sum": 0.0,
                "grad_sum": [[0.0] * d for d in dims], "sq_norm_sum": 0.0}
    g = dyadic_grad(rng, dims)
    return {"count": 1, "loss_sum": loss_sum, "grad_sum": g, "sq_norm_sum": sum_sq(g)}


def build_small_count():
    rng = random.Random(201)
    dims = (2, 3)
    vectors = []

    # Paper mode: count 0 and 1 are skipped (ddof 1 needs m >= 2).
    cfg = config(bs_init=64)
    ctrl = Controller(cfg)
    steps = []
    plan = [0, 1, 0, "n", "n", 1, "n", 0, "n", "n", 1, 1, "n", 0, "n", "n"]
    for t, kind in enumerate(plan):
        if kind in (0, 1):
            stats = tiny_batch_stats(kind, rng, dims, 1.75)
        else:
            loss = loss_curve(t, len(plan), rng)
            xi = raw_target(t, len(plan), rng, 20, 3000) * loss / cfg["lr"]
            stats = make_stats(ctrl.batch_size, loss, grad_mean(t, 16, rng, dims), xi)
        stats, expect = checked_step(ctrl, stats)
        steps.append({"stats": stats, "expect": expect})
    assert steps[0]["expect"]["batch_size"] == 64 and steps[2]["expect"]["skipped"]
    vectors.append(controller_vector(
        "edge_small_count_paper",
        "Paper mode (ddof 1): steps with count 0 or 1 are skipped with reason "
        "'count' and change nothing but skipped_total; the first three steps are "
        "skipped, so the decision stays bs_init (64) until the first accepted step.",
        cfg, steps))

    # Reference mode: count 0 skipped, count 1 accepted (ddof 0, xi = S - G2 = 0).
    cfg = config(mode="reference")
    ctrl = Controller(cfg)
    steps = []
    plan = [0, 1, "n", 1, 0, "n", 2, "n", 1, "n", 0, 0, "n", 1, "n", 3]
    for t, kind in enumerate(plan):
        if kind in (0, 1):
            stats = tiny_batch_stats(kind, rng, dims, 2.25)
        else:
            count = ctrl.batch_size if kind == "n" else kind
            loss = loss_curve(t, len(plan), rng)
            # Large targets: reference mode's xi_avg starts at 0 and L_avg at 1.
            xi = raw_target(t, len(plan), rng, 3000, 30000) * loss / cfg["lr"]
            stats = make_stats(count, loss, grad_mean(t, 16, rng, dims), xi)
        stats, expect = checked_step(ctrl, stats)
        steps.append({"stats": stats, "expect": expect})
    vectors.append(controller_vector(
        "edge_small_count_reference",
        "Reference mode (ddof 0): count 0 is skipped (reason 'count'); count 1 is "
        "accepted, and with one example S == G2 exactly (dyadic gradient entries), "
        "so the variance is exactly 0 and is not clamped. Also counts 2 and 3.",
        cfg, steps))
    return vectors


def normal_stats(rng, t, steps, ctrl, dims=(3, 2)):
    cfg = ctrl.cfg
    loss = loss_curve(t, steps, rng)
    xi = raw_target(t, steps, rng, 20, 3000) * loss / (cfg["c"] * cfg["lr"])
    return make_stats(ctrl.batch_size, loss, grad_mean(t, steps, rng, dims), xi)


def build_nonfinite():
    vectors = []
    nan, inf = math.nan, math.inf

    def spoil(stats, field):
        stats = dict(stats)
        if field == "count":
            stats["count"] = nan
        elif field == "loss_sum":
            stats["loss_sum"] = nan
        elif field == "sq_norm_sum":
            stats["sq_norm_sum"] = inf
        elif field == "grad_sum":
            g = [list(p) for p in stats["grad_sum"]]
            g[-1][1] = -inf
            stats["grad_sum"] = g
        elif field == "loss_and_sq":
            stats["loss_sum"] = nan
            stats["sq_norm_sum"] = nan
        elif field == "count0_loss":
            stats["count"] = 0
            stats["loss_sum"] = nan
        return stats

    # skip policy
    rng = random.Random(301)
    cfg = config(nonfinite="skip")
    ctrl = Controller(cfg)
    plan = [None, None, None, "loss_sum", None, "sq_norm_sum", None, "grad_sum",
            None, "count", "count0_loss", None, "loss_and_sq", None, None]
    steps = []
    for t, field in enumerate(plan):
        stats = normal_stats(rng, t, len(plan), ctrl)
        if field:
            stats = spoil(stats, field)
        stats, expect = checked_step(ctrl, stats)
        assert (expect["reason"] == "nonfinite") == bool(field)
        steps.append({"stats": stats, "expect": expect})
    vectors.append(controller_vector(
        "edge_nonfinite_skip",
        "nonfinite 'skip': NaN loss_sum, +inf sq_norm_sum, -inf in one grad_sum "
        "entry, NaN count, count 0 with NaN loss_sum (the non-finite check comes "
        "first: reason 'nonfinite'), NaN loss_sum and sq_norm_sum; each is skipped "
        "with reason 'nonfinite' (skipped_total and nonfinite_total grow), "
        "interleaved with normal steps.",
        cfg, steps))

    # raise policy: a few normal steps, then the failing step ends the vector.
    cases = [("edge_nonfinite_raise_loss", "loss_sum", "loss_sum",
              "NaN loss_sum"),
             ("edge_nonfinite_raise_sq_norm", "sq_norm_sum", "sq_norm_sum",
              "+inf sq_norm_sum"),
             ("edge_nonfinite_raise_grad", "grad_sum", "grad_sum",
              "-inf in one grad_sum entry"),
             ("edge_nonfinite_raise_loss_and_sq_norm", "loss_and_sq", "loss_sum",
              "NaN loss_sum and NaN sq_norm_sum (the error names loss_sum, the "
              "first in the order count, loss_sum, sq_norm_sum, grad_sum)"),
             ("edge_nonfinite_raise_count", "count", "count", "NaN count")]
    for i, (name, spoil_kind, field, what) in enumerate(cases):
        rng = random.Random(310 + i)
        cfg = config(nonfinite="raise")
        ctrl = Controller(cfg)
        steps = []
        for t in range(9):
            stats, expect = checked_step(ctrl, normal_stats(rng, t, 10, ctrl))
            steps.append({"stats": stats, "expect": expect})
        bad = spoil(normal_stats(rng, 9, 10, ctrl), spoil_kind)
        try:
            ctrl.step(bad)
        except NonFiniteError as err:
            assert err.field == field, (err.field, field)
        else:
            raise AssertionError(name)
        steps.append({"stats": bad, "expect": {"error": "nonfinite", "field": field}})
        vectors.append(controller_vector(
            name,
            "nonfinite 'raise' (the default): nine normal steps, then a step with "
            + what + " must fail with an error naming '" + field
            + "'; that step ends the vector.",
            cfg, steps))
    return vectors


def build_clamp():
    rng = random.Random(401)
    cfg = config()
    ctrl = Controller(cfg)
    plan = [False, False, True, False, True, True, False, False, True, False,
            False, True, False, False]
    rel = [0.0, 0.0, 2e-5, 0.0, 3e-4, 1e-5, 0.0, 0.0, 5e-5, 0.0, 0.0, 1e-4, 0.0, 0.0]
    steps = []
    for t, clamp in enumerate(plan):
        stats = normal_stats(rng, t, len(plan), ctrl)
        if clamp:
            g2 = sum_sq(stats["grad_sum"])
            # S a little below G2/m: the estimate comes out negative.
            stats["sq_norm_sum"] = short(g2 / stats["count"] * (1 - rel[t]), 12)
        stats, expect = checked_step(ctrl, stats)
        assert expect["clamped"] == clamp and (not clamp or expect["variance"] == 0.0)
        steps.append({"stats": stats, "expect": expect})
    return [controller_vector(
        "edge_clamp",
        "Paper mode: on several steps S is slightly below G2/m (relative gap "
        "1e-5 .. 3e-4, as floating-point cancellation can produce), so the "
        "variance estimate is negative: it is clamped to 0 (variance 0, clamped "
        "true, clamped_total grows) and the step is otherwise accepted.",
        cfg, steps)]


def build_loss_floor_above_loss():
    cfg = config(mu=0.5, loss_floor=2.0)
    ctrl = Controller(cfg)
    rng = random.Random(501)
    dims = (2, 2)
    # Mean losses, all dyadic so that loss_sum / m and the mu = 0.5 averages are
    # exact: while every loss is 2.0, L_e = 2.0 exactly and d = 0 exactly.
    losses = [2.0, 2.0, 2.0, 1.5, 1.25, 1.0, 4.0, 8.0, 6.0, 3.0, 1.5, 0.5, 0.25,
              5.0, 7.0]
    steps = []
    for t, loss in enumerate(losses):
        count = ctrl.batch_size
        xi = raw_target(t, len(losses), rng, 20, 3000) * 1.0 / cfg["lr"]
        stats = make_stats(count, loss, grad_mean(t, len(losses), rng, dims), xi)
        assert stats["loss_sum"] == count * loss
        # No loss perturbation here (it would break exactness); the seed is
        # chosen so that no finite raw is near k + 1/2 (checked in main()).
        expect = ctrl.step(stats)
        steps.append({"stats": stats, "expect": expect})
    raws = [s["expect"]["raw"] for s in steps]
    assert raws[:3] == [math.inf] * 3, raws
    assert any(math.isinf(r) for r in raws[3:]) and any(math.isfinite(r) for r in raws)
    return [controller_vector(
        "edge_loss_floor_above_loss",
        "Paper mode, loss_floor 2.0, eps 0, mu 0.5 (chosen so that the averages "
        "are exact in binary): the first three steps have mean loss exactly 2.0, "
        "so L_e = 2.0 and the denominator d = L_e - loss_floor + eps is exactly "
        "0; later the average loss is below the floor (d < 0). In both cases "
        "raw = Infinity and the decision is bs_max; steps with higher loss "
        "give d > 0 and a finite raw.",
        cfg, steps)]


def build_overflow():
    """Finite statistics whose derived values overflow (c * lr * xi and
    L - loss_floor both reach inf, so raw = inf / inf): the non-finite policy,
    naming the derived quantity ("raw"), never a NaN state."""
    overflow = {"count": 2, "loss_sum": 1.7e308, "grad_sum": [[0.0, 0.0], [0.0, 0.0, 0.0]],
                "sq_norm_sum": 1.7e308}
    vectors = []
    for policy, plan in (("skip", ["n", "n", "o", "n", "n", "o", "n", "n"]), ("raise", ["n"] * 6 + ["o"])):
        rng = random.Random(401)
        cfg = config(mode="reference", lr=1e150, c=1e150, mu=0.0, loss_floor=-1.7e308, nonfinite=policy)
        ctrl = Controller(cfg)
        steps = []
        for t, kind in enumerate(plan):
            if kind == "o":
                try:
                    expect = ctrl.step(overflow)
                except NonFiniteError as err:
                    steps.append({"stats": overflow, "expect": {"error": "nonfinite", "field": err.field}})
                    break
                assert expect["reason"] == "nonfinite", expect
                steps.append({"stats": overflow, "expect": expect})
            else:
                stats = make_stats(ctrl.batch_size, loss_curve(t, len(plan), rng), grad_mean(t, 16, rng, (2, 3)),
                                   rng.uniform(1.0, 50.0))
                stats, expect = checked_step(ctrl, stats)
                steps.append({"stats": stats, "expect": expect})
        assert steps[-1]["expect"].get("field", "raw") == "raw"
        vectors.append(controller_vector(
            f"edge_overflow_{policy}",
            f"Reference mode, lr 1e150, c 1e150, mu 0, loss_floor -1.7e308, nonfinite '{policy}': "
            "finite statistics (count 2, loss_sum = S = 1.7e308) make c * lr * xi and "
            "L - loss_floor overflow to inf, so raw = inf / inf is NaN: the step follows the "
            "non-finite policy naming 'raw' (" + ("skipped, reason 'nonfinite'" if policy == "skip"
                                                  else "an error on 'raw' ends the vector") + "); "
            "normal steps around it decide as usual.",
            cfg, steps))
    return vectors


def build_init_discretised():
    """The first decision obeys multiple_of / buckets like every later one: a
    skipped first step (count 1 in paper mode) reports the decision in force."""
    rng = random.Random(301)
    dims = (2, 3)
    cases = [
        ("edge_init_multiple_of",
         "Paper mode, bs 10..1000, multiple_of 16, bs_init null: the first batch "
         "size is bs_min discretised like every decision (10 -> 16), so the "
         "skipped first steps (count 1) report 16, not 10.",
         config(bs_min=10, bs_max=1000, bs_init=None, multiple_of=16), 16),
        ("edge_init_buckets",
         "Paper mode, bs 5..1000, buckets [24, 100, 1000], bs_init null: the "
         "first batch size is the smallest bucket >= bs_min (24), reported by the "
         "skipped first steps (count 1).",
         config(bs_min=5, bs_max=1000, bs_init=None, buckets=[24, 100, 1000]), 24),
    ]
    vectors = []
    for name, description, cfg, first in cases:
        ctrl = Controller(cfg)
        steps = []
        plan = [1, 1, "n", "n", "n", "n", "n", "n", "n"]
        for t, kind in enumerate(plan):
            if kind == 1:
                stats = tiny_batch_stats(1, rng, dims, 1.5)
            else:
                loss = loss_curve(t, len(plan), rng)
                xi = raw_target(t, len(plan), rng, 8, 600) * loss / cfg["lr"]
                stats = make_stats(ctrl.batch_size, loss, grad_mean(t, 16, rng, dims), xi)
            stats, expect = checked_step(ctrl, stats)
            steps.append({"stats": stats, "expect": expect})
        assert [s["expect"]["batch_size"] for s in steps[:2]] == [first, first], name
        assert steps[0]["expect"]["skipped"] and not steps[2]["expect"]["skipped"]
        vectors.append(controller_vector(name, description, cfg, steps))
    return vectors


def build_config_errors():
    cases = [
        ("bs_min_zero", {"bs_min": 0}, "bs_min"),
        ("bs_min_above_bs_max", {"bs_min": 100, "bs_max": 50, "bs_init": None}, "bs_max"),
        ("bs_min_non_integer", {"bs_min": 16.5, "bs_init": None}, "bs_min"),
        ("bs_max_non_integer", {"bs_max": 100.5}, "bs_max"),
        ("lr_zero", {"lr": 0.0}, "lr"),
        ("lr_negative", {"lr": -0.1}, "lr"),
        ("lr_nan", {"lr": math.nan}, "lr"),
        ("mu_one", {"mu": 1.0}, "mu"),
        ("mu_negative", {"mu": -0.1}, "mu"),
        ("c_zero", {"c": 0.0}, "c"),
        ("eps_negative", {"eps": -1.0}, "eps"),
        ("loss_floor_infinite", {"loss_floor": math.inf}, "loss_floor"),
        ("mode_unknown", {"mode": "foo"}, "mode"),
        ("bs_init_below_bs_min", {"bs_init": 8}, "bs_init"),
        ("bs_init_above_bs_max", {"bs_init": 4096}, "bs_init"),
        ("multiple_of_zero", {"multiple_of": 0}, "multiple_of"),
        ("multiple_of_none_in_bounds",
         {"bs_min": 10, "bs_max": 15, "bs_init": None, "multiple_of": 16}, "multiple_of"),
        ("buckets_unsorted", {"buckets": [32, 16, 64]}, "buckets"),
        ("buckets_duplicate", {"buckets": [16, 32, 32, 64]}, "buckets"),
        ("buckets_empty", {"buckets": []}, "buckets"),
        ("buckets_outside_bounds", {"buckets": [16, 64, 4096]}, "buckets"),
        ("multiple_of_and_buckets", {"multiple_of": 16, "buckets": [16, 32]}, "buckets"),
        ("nonfinite_unknown", {"nonfinite": "ignore"}, "nonfinite"),
        ("bs_init_not_a_multiple",
         {"bs_min": 10, "bs_max": 1000, "bs_init": 20, "multiple_of": 16}, "bs_init"),
        ("bs_init_not_a_bucket", {"bs_init": 16, "buckets": [32, 64]}, "bs_init"),
    ]
    vectors = []
    for suffix, overrides, argument in cases:
        cfg = config(**overrides)
        try:
            Controller(cfg)
        except ConfigError as err:
            assert err.argument == argument, (suffix, err.argument)
        else:
            raise AssertionError(suffix)
        shown = ", ".join(f"{k} {json.dumps(encode(v))}" for k, v in overrides.items())
        vectors.append(controller_vector(
            "config_error_" + suffix,
            f"Invalid configuration ({shown}): constructing the controller must "
            f"fail with an error naming '{argument}'.",
            cfg, [], {"argument": argument}))
    return vectors


def sampler_vector(name, description, seed, n, world_size, batch_sizes):
    return {"format": FORMAT, "kind": "sampler", "name": name,
            "description": description, "seed": seed, "num_examples": n,
            "world_size": world_size, "batch_sizes": batch_sizes,
            "tolerance": dict(TOLERANCE),
            "expect": sampler_batches(seed, n, world_size, batch_sizes)}


def build_samplers():
    rng = random.Random(601)
    big = [rng.choice([1, 7, 16, 33, 64, 100, 128, 250, 333, 512]) for _ in range(30)]
    return [
        sampler_vector("sampler_small_epochs",
                       "N = 10, one worker: batches that cross epoch boundaries "
                       "finish the old epoch's order and continue with the new one.",
                       7, 10, 1, [4, 9, 3, 7, 10, 2, 5]),
        sampler_vector("sampler_batch_larger_than_n",
                       "N = 10, three workers: batches larger than N span several "
                       "epochs; uneven remainders across ranks, and a batch of 2 "
                       "gives rank 2 an empty shard.",
                       123, 10, 3, [25, 7, 13, 31, 2, 11]),
        sampler_vector("sampler_world_size_4",
                       "N = 37, four workers, batch sizes with every remainder "
                       "mod 4.",
                       2024, 37, 4, [10, 13, 7, 5, 22, 3, 40, 1]),
        sampler_vector("sampler_large_seed",
                       "seed 2**63 + 5 (above 2**53 and 2**63: parse it as an "
                       "unsigned 64-bit integer), N = 17, three workers.",
                       2 ** 63 + 5, 17, 3, [5, 17, 8, 30, 4]),
        sampler_vector("sampler_n1000",
                       "N = 1000, four workers, 30 varied batch sizes over several "
                       "epochs.",
                       42, 1000, 4, big),
    ]


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def encode(value):
    """Non-finite floats -> "NaN" / "Infinity" / "-Infinity", recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def write_vector(vector, out_dir=OUT_DIR):
    text = json.dumps(encode(vector), indent=1, sort_keys=True, allow_nan=False)
    path = os.path.join(out_dir, vector["name"] + ".json")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")
    return path


def check_vector(vector):
    """Final checks that every controller vector keeps the README's promises."""
    if vector["kind"] != "controller":
        return
    assert set(vector["config"]) == set(CONFIG_KEYS)
    if vector["expect_config_error"] is None:
        assert len(vector["steps"]) >= 7, vector["name"]
    for step in vector["steps"]:
        e, s = step["expect"], step["stats"]
        if "error" in e:
            assert step is vector["steps"][-1]
            continue
        raw = e["raw"]
        assert raw is None or not near_half(raw), (vector["name"], raw)
        if not e["skipped"] and s["count"] >= 2:
            g2m = sum_sq(s["grad_sum"]) / s["count"]
            gap = abs(s["sq_norm_sum"] - g2m)
            assert gap == 0 or gap >= VARIANCE_MARGIN * abs(s["sq_norm_sum"]), (
                vector["name"], gap)
            assert e["clamped"] == (s["sq_norm_sum"] < g2m)


def main(argv=None):
    """``generate_vectors.py [OUT_DIR]``: write every vector (default: the package's folder)."""
    argv = sys.argv[1:] if argv is None else argv
    out_dir = argv[0] if argv else OUT_DIR
    vectors = []
    vectors += build_main_vectors()
    vectors += build_small_count()
    vectors += build_nonfinite()
    vectors += build_clamp()
    vectors += build_loss_floor_above_loss()
    vectors += build_init_discretised()
    vectors += build_overflow()
    vectors += build_config_errors()
    vectors += build_samplers()
    names = [v["name"] for v in vectors]
    assert len(names) == len(set(names))
    os.makedirs(out_dir, exist_ok=True)
    for vector in vectors:
        if vector["kind"] == "controller":
            check_vector(vector)
        path = write_vector(vector, out_dir)
        n = len(vector["steps"] if vector["kind"] == "controller" else vector["expect"])
        print(f"{os.path.relpath(path)}: {n} steps")


if __name__ == "__main__":
    main()
