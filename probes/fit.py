"""Linear probes with honest evaluation.

    cfg = FitConfig(n_splits=5, seed=0)
    folds = puzzle_folds(groups, sizes, cfg.n_splits, cfg.seed)      # one fold per puzzle
    res = probe_target(X, y, groups=groups, folds=folds, controls={"token": types}, config=cfg)
    res["layers"][3]["auroc"], res["layers"][3]["selectivity"], res["permutation"]["p_value"]

* Probe: standardisation + scikit-learn LogisticRegression with balanced class weights; C
  chosen per outer fold by `GridSearchCV` over `FitConfig.Cs` with inner folds that are again
  whole puzzles (class-balanced log-loss scoring).
* Outer cross-validation: folds of whole puzzles (`StratifiedGroupKFold`, stratified by
  puzzle size), so no puzzle is in both train and test. Metrics are on the pooled out-of-fold
  predictions: accuracy and balanced accuracy of the balanced probe's decision (logit >= 0);
  ECE (fixed equal-width bins) and Brier score of its probabilities moved back to the training
  part's base rate (logit + log(prior / (1 - prior))); AUROC of the scores w.(x - mean)/scale
  without the intercept.
  Why not plain probabilities: the base rate of a training part is anti-correlated with that of
  its held-out part (whole puzzles move between them), so a signal-free probe that predicts the
  base rate scores far below chance on pooled AUROC and accuracy. Balanced weights keep the
  decision off the base rate, and the intercept-free score keeps the ranking off it.
* Controls: Hewitt-Liang control tasks (each type of a row gets one seeded random label with
  the task's base rate: the type is the token at the position, or the response for a target
  that labels whole responses, see `probes.targets.CONTROL_UNITS`; fitted with the task probe's
  C per fold, so both probes have the same capacity; the control's metrics are means over
  `control_draws` seeded labellings; selectivity = accuracy(task) - accuracy(control), also
  given with balanced accuracy); a seeded permutation test of the AUROC (refits with each
  fold's chosen C on permuted labels; a label constant within each puzzle is permuted between
  puzzles); the layer-0 (embedding) probe and a bag-of-tokens probe on the prefix as baselines.
* `fit_probe` refits on all rows (C given, e.g. `consensus_C` of the folds' choices, or by
  inner CV) and returns a `LinearProbe`, saved with
  `save_probe` (npz arrays + json metadata) and read back with `load_probe`.

Everything is deterministic for a seed. Fits run with one BLAS thread: the matrices are small,
and threads only contend with whatever else the machine runs.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analysis.cache import json_safe
from train.errors import UserError

PROBE_FORMAT = 1


class ProbeError(UserError):
    pass


def single_thread(fn: Callable) -> Callable:
    """Run `fn` with BLAS/OpenMP pools limited to one thread."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return fn(*args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class FitConfig:
    n_splits: int = 5                      # outer folds (of puzzles)
    inner_splits: int = 3                  # inner folds choosing C
    Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    seed: int = 0
    n_permutations: int = 100              # permutation test at the best layer (0 = none)
    control_draws: int = 5                 # control-task labellings averaged (seeds seed, seed + 1, ...)
    n_bins: int = 10                       # ECE bins
    max_iter: int = 2000
    min_class: int = 5                     # fewer rows of either class: the target is skipped
    min_class_puzzles: int = 2             # ... or either class in fewer puzzles

    def params(self) -> dict:
        d = asdict(self)
        d["Cs"] = list(self.Cs)
        return d


def parse_Cs(spec: str | Sequence[float]) -> tuple[float, ...]:
    """"0.01,0.1,1" (or numbers) -> a grid of positive inverse regularisation strengths."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        grid = tuple(float(c) for c in items if str(c).strip())
    except ValueError:
        raise ProbeError(f"bad C grid {spec!r}: use positive numbers, e.g. 0.01,0.1,1") from None
    if not grid or any(not c > 0 for c in grid):
        raise ProbeError(f"bad C grid {spec!r}: use positive numbers, e.g. 0.01,0.1,1")
    return grid


# --------------------------------------------------------------------------- metrics

def expected_calibration_error(y: Sequence[int], p: Sequence[float], n_bins: int = 10) -> float:
    """Sum over equal-width bins of P(bin) * |mean label - mean probability|; p = 1.0 falls
    in the last bin."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    b = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for k in np.unique(b):
        m = b == k
        ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def brier_score(y: Sequence[int], p: Sequence[float]) -> float:
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    return float(np.mean((p - y) ** 2)) if len(y) else float("nan")


def binary_metrics(y: Sequence[int], p: Sequence[float], n_bins: int = 10, score: Sequence[float] | None = None,
                   pred: Sequence[int] | None = None) -> dict[str, float]:
    """AUROC of `score` (default p; nan with one class), accuracy and balanced accuracy of
    `pred` (default p >= 0.5), ECE and Brier of p."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y, p = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    score = p if score is None else np.asarray(score, dtype=float)
    both = len(np.unique(y)) == 2
    pred = (p >= 0.5).astype(int) if pred is None else np.asarray(pred, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(y, pred)) if len(y) else float("nan")
    return {"auroc": float(roc_auc_score(y, score)) if both else float("nan"),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "balanced_accuracy": bacc,
            "ece": expected_calibration_error(y, p, n_bins), "brier": brier_score(y, p),
            "n": int(len(y)), "pos_rate": float(y.mean()) if len(y) else float("nan")}


def selectivity(task: dict, control: dict, metric: str = "accuracy") -> float:
    """Hewitt-Liang selectivity: the task probe's metric minus the control task probe's."""
    return float(task[metric] - control[metric])


# --------------------------------------------------------------------------- folds

def puzzle_folds(groups: Sequence[Any], strata: Sequence[Any], n_splits: int, seed: int) -> np.ndarray:
    """Outer fold of each row: whole puzzles (groups) are dealt to folds, stratified by size
    (strata, constant within a puzzle). Deterministic for the set of puzzles and the seed."""
    folds = puzzle_fold_map(groups, strata, n_splits, seed)
    return np.array([folds[g] for g in groups], dtype=int)


def puzzle_fold_map(groups: Sequence[Any], strata: Sequence[Any], n_splits: int, seed: int) -> dict[Any, int]:
    """{puzzle: fold}; the same map for every checkpoint given the same puzzles."""
    from sklearn.model_selection import StratifiedGroupKFold

    size_of: dict[Any, Any] = {}
    for g, s in zip(groups, strata):
        if size_of.setdefault(g, s) != s:
            raise ProbeError(f"puzzle {g!r} has two sizes ({size_of[g]} and {s})")
    uniq = sorted(size_of, key=str)
    if len(uniq) < 2:
        raise ProbeError(f"cross-validation by puzzle needs at least 2 puzzles, got {len(uniq)}")
    k = min(int(n_splits), len(uniq))
    if k < 2:
        raise ProbeError(f"need at least 2 folds, got {n_splits}")
    strata_g = [str(size_of[g]) for g in uniq]
    if max(strata_g.count(s) for s in set(strata_g)) < k:
        strata_g = ["all"] * len(uniq)  # no size has k puzzles: stratifying is impossible
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    out: dict[Any, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a size rarer than k puzzles cannot be spread evenly
        for f, (_, test) in enumerate(sgkf.split(np.zeros(len(uniq)), strata_g, groups=np.arange(len(uniq)))):
            for i in test:
                out[uniq[i]] = f
    return out


# --------------------------------------------------------------------------- one probe

def _logit(p: float) -> float:
    p = float(np.clip(p, 1e-6, 1 - 1e-6))
    return float(np.log(p / (1 - p)))


@dataclass
class LinearProbe:
    """A fitted probe. decision(x) = ((x - mean) / scale) @ coef + intercept is the log-odds
    under balanced classes; P(y=1 | x) = sigmoid(decision + logit(prior)), prior = the
    training base rate."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray
    C: float
    prior: float = 0.5
    meta: dict = field(default_factory=dict)

    def decision_function(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return ((X - self.mean) / self.scale) @ self.coef + self.intercept

    def predict(self, X: Any) -> np.ndarray:
        """The balanced decision: 1 where decision >= 0."""
        return (self.decision_function(X) >= 0).astype(int)

    def predict_proba(self, X: Any) -> np.ndarray:
        """P(y=1) per row, at the training base rate."""
        from scipy.special import expit

        return expit(self.decision_function(X) + _logit(self.prior))

    @property
    def direction(self) -> np.ndarray:
        """The probe's normal in the raw residual space (coef / scale)."""
        return self.coef / self.scale


def save_probe(probe: LinearProbe, path: str | Path) -> Path:
    """Write `<path>.npz` (arrays) and `<path>.json` (C, metadata); returns the npz path."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz = stem.with_name(stem.name + ".npz")
    with open(npz, "wb") as fh:
        np.savez(fh, coef=probe.coef, intercept=np.array([probe.intercept]), mean=probe.mean, scale=probe.scale)
    stem.with_name(stem.name + ".json").write_text(
        json.dumps(json_safe({"format": PROBE_FORMAT, "C": probe.C, "prior": probe.prior, "meta": probe.meta}),
                   indent=1, default=str) + "\n",
        encoding="utf-8")
    return npz


def load_probe(path: str | Path) -> LinearProbe:
    """A probe saved by `save_probe` (give the .npz, the .json or their common stem)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    npz, meta = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    if not npz.is_file() or not meta.is_file():
        raise ProbeError(f"no saved probe at {stem} (need {npz.name} and {meta.name})")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        with np.load(npz) as z:
            arrays = {k: z[k] for k in ("coef", "intercept", "mean", "scale")}
    except (OSError, ValueError, KeyError) as exc:
        raise ProbeError(f"{stem}: unreadable saved probe ({exc})") from None
    if info.get("format") != PROBE_FORMAT:
        raise ProbeError(f"{meta}: unknown probe format {info.get('format')!r}")
    return LinearProbe(coef=arrays["coef"], intercept=float(arrays["intercept"][0]), mean=arrays["mean"],
                       scale=arrays["scale"], C=float(info["C"]), prior=float(info["prior"]),
                       meta=info.get("meta", {}))



def _pipeline(C: float, sparse: bool, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(with_mean=not sparse),
                         LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced"))


class Fitted:
    """A fitted pipeline and its training base rate.

    predict: the balanced decision; proba: P(y=1) at the training base rate; score: the
    decision without the intercept (for ranking across folds)."""

    def __init__(self, pipeline: Any, prior: float):
        self.pipeline, self.prior = pipeline, float(prior)

    def predict(self, X: Any) -> np.ndarray:
        return (self.pipeline.decision_function(X) >= 0).astype(int)

    def proba(self, X: Any) -> np.ndarray:
        from scipy.special import expit

        return expit(self.pipeline.decision_function(X) + _logit(self.prior))

    def score(self, X: Any) -> np.ndarray:
        return self.pipeline.decision_function(X) - self.pipeline[-1].intercept_[0]


class Constant:
    """The fallback for a training part with one class: predicts it."""

    def __init__(self, rate: float):
        self.prior = float(rate)

    def predict(self, X: Any) -> np.ndarray:
        return np.full(X.shape[0], int(self.prior >= 0.5))

    def proba(self, X: Any) -> np.ndarray:
        return np.full(X.shape[0], self.prior)

    def score(self, X: Any) -> np.ndarray:
        return np.zeros(X.shape[0])


def balanced_log_loss(estimator: Any, X: Any, y: np.ndarray) -> float:
    """Scorer: minus the mean over the classes present of each class's mean log-loss."""
    p = np.clip(estimator.predict_proba(X)[:, 1].astype(np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, dtype=int)
    losses = [-np.mean(np.log(p[y == 1]))] if (y == 1).any() else []
    losses += [-np.mean(np.log(1 - p[y == 0]))] if (y == 0).any() else []
    return -float(np.mean(losses))


def _inner_splits(y: np.ndarray, groups: np.ndarray, strata: np.ndarray, config: FitConfig) -> list:
    """Inner folds of whole puzzles whose training part has both classes."""
    if len(np.unique(groups)) < 2:
        return []
    f = puzzle_folds(groups, strata, config.inner_splits, config.seed + 1)
    out = []
    for k in np.unique(f):
        tr, te = np.flatnonzero(f != k), np.flatnonzero(f == k)
        if len(np.unique(y[tr])) == 2 and len(te):
            out.append((tr, te))
    return out


def fit_model(X: Any, y: np.ndarray, groups: np.ndarray, strata: np.ndarray, config: FitConfig,
              C: float | None = None) -> tuple[Fitted | Constant, float]:
    """A fitted standardise + logistic-regression probe and its C (chosen by inner CV over
    whole puzzles unless given; the middle of the grid when no inner split is usable)."""
    import scipy.sparse as sp
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV

    y = np.asarray(y, dtype=int)
    prior = float(y.mean()) if len(y) else 0.5
    if len(np.unique(y)) < 2:
        return Constant(prior), float("nan")
    sparse = sp.issparse(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if C is None:
            splits = _inner_splits(y, groups, strata, config)
            if splits:
                search = GridSearchCV(_pipeline(1.0, sparse, config.max_iter),
                                      {"logisticregression__C": list(config.Cs)}, cv=splits,
                                      scoring=balanced_log_loss, refit=True, error_score=np.nan, n_jobs=1)
                search.fit(X, y)
                return Fitted(search.best_estimator_, prior), float(search.best_params_["logisticregression__C"])
            C = float(config.Cs[len(config.Cs) // 2])
        model = _pipeline(C, sparse, config.max_iter).fit(X, y)
    return Fitted(model, prior), float(C)


@dataclass
class CVResult:
    proba: np.ndarray              # out-of-fold P(y=1) per row (at the training base rate)
    score: np.ndarray              # out-of-fold ranking score (no intercept) per row
    pred: np.ndarray               # out-of-fold balanced decision per row (-1 where none)
    Cs: dict[int, float]           # chosen C per fold
    metrics: dict[str, float]
    models: dict[int, Any] | None = None


@single_thread
def cross_validate(X: Any, y: Sequence[int], groups: Sequence[Any], folds: Sequence[int], config: FitConfig, *,
                   strata: Sequence[Any] | None = None, Cs: dict[int, float] | None = None,
                   keep_models: bool = False) -> CVResult:
    """Out-of-fold probabilities over the given outer folds (C by inner CV, or fixed per fold
    by `Cs`), and the pooled metrics."""
    y, groups, folds = np.asarray(y, dtype=int), np.asarray(groups), np.asarray(folds)
    strata = np.zeros(len(y), dtype=int) if strata is None else np.asarray(strata)
    proba, score, pred = np.full(len(y), np.nan), np.full(len(y), np.nan), np.full(len(y), -1)
    chosen, models = {}, {}
    for k in np.unique(folds):
        tr, te = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        if len(tr) == 0 or len(te) == 0:
            continue
        if set(groups[tr]) & set(groups[te]):
            raise ProbeError("a puzzle is in both the training and the test part of a fold")
        fixed = None if Cs is None else Cs.get(int(k))
        fixed = None if fixed is None or np.isnan(fixed) else fixed
        model, C = fit_model(X[tr], y[tr], groups[tr], strata[tr], config, C=fixed)
        proba[te], score[te], pred[te] = model.proba(X[te]), model.score(X[te]), model.predict(X[te])
        chosen[int(k)] = C
        if keep_models:
            models[int(k)] = model
    ok = ~np.isnan(proba)
    return CVResult(proba=proba, score=score, pred=pred, Cs=chosen,
                    metrics=binary_metrics(y[ok], proba[ok], config.n_bins, score[ok], pred[ok]),
                    models=models if keep_models else None)


def consensus_C(Cs: Sequence[float]) -> float | None:
    """The geometric median of the outer folds' chosen C (None when no fold chose one)."""
    v = np.array([c for c in Cs if c is not None and not np.isnan(c)], dtype=float)
    return float(np.exp(np.median(np.log(v)))) if len(v) else None


@single_thread
def fit_probe(X: Any, y: Sequence[int], groups: Sequence[Any], config: FitConfig, *,
              strata: Sequence[Any] | None = None, C: float | None = None, meta: dict | None = None) -> LinearProbe:
    """A probe fitted on all rows, with the given C or one chosen by inner cross-validation
    over puzzles."""
    y, groups = np.asarray(y, dtype=int), np.asarray(groups)
    strata = np.zeros(len(y), dtype=int) if strata is None else np.asarray(strata)
    model, C = fit_model(np.asarray(X), y, groups, strata, config, C=C)
    if isinstance(model, Constant):
        d = np.asarray(X).shape[1]
        return LinearProbe(coef=np.zeros(d), intercept=0.0, mean=np.zeros(d), scale=np.ones(d), C=C,
                           prior=model.prior, meta=dict(meta or {}))
    scaler, lr = model.pipeline[0], model.pipeline[-1]
    return LinearProbe(coef=lr.coef_[0].astype(np.float64), intercept=float(lr.intercept_[0]),
                       mean=scaler.mean_.astype(np.float64), scale=scaler.scale_.astype(np.float64), C=C,
                       prior=model.prior, meta=dict(meta or {}))


# --------------------------------------------------------------------------- controls

def control_labels(token_types: Sequence[Any], y: Sequence[int], seed: int) -> np.ndarray:
    """Hewitt-Liang control task: every type (a token id, a response, ...) gets one random
    label, drawn with the task's base rate; seeded, and independent of row order."""
    types = np.asarray(token_types)
    y = np.asarray(y, dtype=float)
    uniq = sorted(set(types.tolist()), key=str)
    rng = np.random.default_rng(seed)
    draw = rng.random(len(uniq)) < (y.mean() if len(y) else 0.5)
    label = dict(zip(uniq, draw.astype(int)))
    return np.array([label[t] for t in types.tolist()], dtype=int)


def permute_labels(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One permutation: between puzzles when the label is constant within each puzzle, else
    across rows."""
    uniq, inv = np.unique(groups, return_inverse=True)
    per_group = np.zeros(len(uniq))
    np.add.at(per_group, inv, y)
    counts = np.bincount(inv, minlength=len(uniq))
    rate = per_group / counts
    if np.all((rate == 0) | (rate == 1)):
        return rate[rng.permutation(len(uniq))][inv].astype(int)
    return y[rng.permutation(len(y))]


@single_thread
def permutation_test(X: Any, y: Sequence[int], groups: Sequence[Any], folds: Sequence[int], config: FitConfig,
                     Cs: dict[int, float], observed: float, *, n_permutations: int | None = None,
                     strata: Sequence[Any] | None = None) -> dict[str, float]:
    """p-value of the observed AUROC against probes refitted (same folds, each fold's C) on
    permuted labels: (1 + #{null >= observed}) / (1 + n)."""
    n = config.n_permutations if n_permutations is None else int(n_permutations)
    y, groups = np.asarray(y, dtype=int), np.asarray(groups)
    rng = np.random.default_rng(config.seed + 7919)
    null = []
    for _ in range(n):
        yp = permute_labels(y, groups, rng)
        r = cross_validate(X, yp, groups, folds, config, strata=strata, Cs=Cs)
        null.append(r.metrics["auroc"])
    null = np.array([v for v in null if not np.isnan(v)])
    if not len(null) or np.isnan(observed):
        return {"n": int(n), "p_value": float("nan"), "null_mean": float("nan"), "null_q95": float("nan")}
    return {"n": int(len(null)), "p_value": float((1 + np.sum(null >= observed)) / (1 + len(null))),
            "null_mean": float(null.mean()), "null_q95": float(np.quantile(null, 0.95))}


def bag_of_tokens(prefixes: Sequence[Sequence[int]]):
    """Sparse (rows, token types seen) log(1 + count) matrix of the prefix tokens."""
    import scipy.sparse as sp

    vocab: dict[int, int] = {}
    indptr, indices, data = [0], [], []
    for seq in prefixes:
        ids, counts = np.unique(np.asarray(seq, dtype=np.int64), return_counts=True)
        for t, c in zip(ids.tolist(), counts.tolist()):
            indices.append(vocab.setdefault(t, len(vocab)))
            data.append(np.log1p(c))
        indptr.append(len(indices))
    return sp.csr_matrix((np.array(data, dtype=np.float64), np.array(indices, dtype=np.int64), np.array(indptr)),
                         shape=(len(prefixes), max(len(vocab), 1)))


# --------------------------------------------------------------------------- one target

@single_thread
def probe_target(X: Any, y: Sequence[int], *, groups: Sequence[Any], folds: Sequence[int],
                 controls: Mapping[str, Sequence[Any]], config: FitConfig, strata: Sequence[Any] | None = None,
                 layers: Sequence[int] | None = None, rows: Sequence[int] | None = None, bag: Any = None,
                 kinds: Sequence[Sequence[str]] | None = None,
                 progress: Callable[[], None] | None = None) -> dict:
    """Probe every layer of X (rows, layers, hidden) for one target.

    `controls` maps a control task's name to the type of each row (`control_labels` gives each
    type one random label); the first is the control of `control` and `selectivity`, every one
    is reported under `controls`. Returns per layer the task metrics, the control tasks' metrics
    and the selectivities; the best layer (highest AUROC); at it the permutation test and AUROC
    by position kind; and the baselines (layer 0, bag of tokens when `bag` is given). `rows`
    picks rows of X (which may be a memory map: only one layer is read at a time); y and the
    rest are already picked. `progress` is called per layer.
    """
    y, groups, folds = np.asarray(y, dtype=int), np.asarray(groups), np.asarray(folds)
    strata = np.zeros(len(y), dtype=int) if strata is None else np.asarray(strata)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    out: dict[str, Any] = {"n_rows": int(len(y)), "n_puzzles": int(len(np.unique(groups))),
                           "pos_rate": float(y.mean()) if len(y) else float("nan"), "layers": []}
    p_pos, p_neg = len(set(groups[y == 1].tolist())), len(set(groups[y == 0].tolist()))
    if min(n_pos, n_neg) < config.min_class:
        out["skipped"] = f"too few rows of one class ({n_pos} positive, {n_neg} negative)"
    elif min(p_pos, p_neg) < config.min_class_puzzles:
        out["skipped"] = f"one class in too few puzzles ({p_pos} with positives, {p_neg} with negatives)"
    elif len(np.unique(folds)) < 2:
        out["skipped"] = "fewer than 2 folds of puzzles"
    if "skipped" in out:
        return out
    if not controls:
        raise ProbeError("probe_target needs at least one control task")
    draws = range(config.seed, config.seed + max(int(config.control_draws), 1))
    ycs = {name: [control_labels(types, y, seed) for seed in draws] for name, types in controls.items()}
    primary = next(iter(ycs))
    out["control_task"] = primary
    layers = list(range(X.shape[1])) if layers is None else list(layers)
    cv_by_layer = {}

    def layer_matrix(layer: int) -> np.ndarray:
        Xl = np.asarray(X[:, layer, :], dtype=np.float32)
        return Xl if rows is None else Xl[np.asarray(rows)]

    for layer in layers:
        Xl = layer_matrix(layer)
        task = cross_validate(Xl, y, groups, folds, config, strata=strata)
        cv_by_layer[layer] = task
        ctrl = {}
        for name, labellings in ycs.items():
            runs = [cross_validate(Xl, yc, groups, folds, config, strata=strata, Cs=task.Cs).metrics
                    for yc in labellings]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # AUROC is NaN when a draw has one class
                m = {k: float(np.nanmean([r[k] for r in runs])) for k in ("auroc", "accuracy", "balanced_accuracy")}
            ctrl[name] = {**m, "selectivity": selectivity(task.metrics, m),
                          "selectivity_balanced": selectivity(task.metrics, m, "balanced_accuracy")}
        main = ctrl[primary]
        out["layers"].append({"layer": int(layer), **task.metrics, "C": [task.Cs[k] for k in sorted(task.Cs)],
                              "control": {k: main[k] for k in ("auroc", "accuracy", "balanced_accuracy")},
                              "selectivity": main["selectivity"],
                              "selectivity_balanced": main["selectivity_balanced"], "controls": ctrl})
        if progress is not None:
            progress()
    aurocs = [r["auroc"] for r in out["layers"]]
    best = int(layers[int(np.nanargmax(aurocs))]) if not np.all(np.isnan(aurocs)) else int(layers[-1])
    out["best_layer"] = best
    res = cv_by_layer[best]
    if config.n_permutations:
        out["permutation"] = {"layer": best, **permutation_test(
            layer_matrix(best), y, groups, folds, config, res.Cs, res.metrics["auroc"],
            strata=strata)}
    if kinds is not None:
        from analysis.verify_prob import KINDS

        out["by_kind"] = {}
        for kind in KINDS:
            m = np.array([kind in k for k in kinds])
            if m.any():
                out["by_kind"][kind] = binary_metrics(y[m], res.proba[m], config.n_bins, res.score[m], res.pred[m])
    out["baselines"] = {}
    if 0 in cv_by_layer:
        out["baselines"]["layer0"] = cv_by_layer[0].metrics
    if bag is not None:
        out["baselines"]["bag_of_tokens"] = cross_validate(bag, y, groups, folds, config, strata=strata).metrics
    out["oof_best"] = {"proba": res.proba.tolist(), "score": res.score.tolist(), "pred": res.pred.tolist()}
    return out
