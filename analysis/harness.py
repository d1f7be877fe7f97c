"""The checkpoint harness: run analyses over checkpoints, one model in memory at a time.

    registry = Registry("ckpts.yaml")
    cks = select_checkpoints(registry, run="kk-tiny", stage="stage2", steps=(0, 200), every=2)
    outcomes = analyse_checkpoints(registry, cks, [get_analysis("behaviours")],
                                   cache=ResultCache("reports/cache"), config=HarnessConfig())

For each checkpoint the harness looks up every analysis's result in the `ResultCache` (keyed
by checkpoint id, analysis name and parameters, which include the weights fingerprint, the
puzzle set and, for analyses that read generations, the generation settings). Only when
something is missing does it load the checkpoint through nnsight, build an
`AnalysisContext` and run the missing analyses; then it frees the model before the next.

A checkpoint that cannot be used (missing folder, unreadable weights, a tokenizer that does
not fit the model) yields one error line naming it; the others are still analysed and nothing
is cached for it.

Plug-ins: an analysis is a subclass of `Analysis` decorated with `@register_analysis`, in any
module of the `analysis` or `probes` packages (found by `load_plugins`) or in a module named
with `--plugin`. It supplies `run(ctx) -> dict` (JSON-able), and for reports
`report_section(result) -> (markdown, figures)` and `trend_metrics(result) -> {label: value}`.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import inspect
import json
import pkgutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import typer

from analysis.cache import ResultCache, weights_fingerprint
from train.evaluate import EVAL_SEED
from analysis.selection import OptionGroup
from train.errors import UserError
from train.data import parse_people, size_spec
from train.kk import Puzzle
from train.models import ModelLoadError, first_line
from train.registry import Checkpoint, Registry

PLUGIN_PACKAGES = ("analysis", "probes")
GENERATIONS = "generations"        # cache name of a checkpoint's puzzle-set generations
SHARED_CACHE_ID = "_shared"        # cache "checkpoint" for checkpoint-independent results


class HarnessError(UserError):
    pass


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class PuzzleSetConfig:
    """The fixed puzzle set: the first `per_size` puzzles of each size of evaluation's held-out
    set (seed reserved for evaluation), so evaluation's kept generations can be reused."""

    sizes: tuple[int, ...] = (3, 4, 5, 6, 7)
    per_size: int = 8
    seed: int = EVAL_SEED
    fixed_cast: bool = False   # the checkpoints' puzzle world (the CLIs read it: `checkpoints_cast`)

    def params(self) -> dict:
        return {"sizes": list(self.sizes), "per_size": self.per_size, "seed": self.seed,
                "fixed_cast": self.fixed_cast}


@dataclass(frozen=True)
class GenerationConfig:
    """How each checkpoint answers the puzzle set (greedy by default)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_style: str = "chat"
    batch_size: int = 8
    seed: int = 0

    def params(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")  # does not change the outputs
        return d


def _default(cls: type, name: str) -> Any:
    """A dataclass field's default: each default is written once, in its config class."""
    return next(f.default for f in fields(cls) if f.name == name)


def _puzzle_set(puzzles_per_size: int, puzzle_sizes: str, puzzle_seed: int) -> PuzzleSetConfig:
    return PuzzleSetConfig(sizes=tuple(parse_people(puzzle_sizes)), per_size=puzzles_per_size, seed=puzzle_seed)


# The command-line options of `PuzzleSetConfig` and `GenerationConfig` (`python -m analysis
# report`, `python -m probes run`), with the config classes' defaults.
PUZZLE_SET_OPTIONS = OptionGroup(
    _puzzle_set,
    puzzles_per_size=(int, typer.Option(_default(PuzzleSetConfig, "per_size"), min=1,
                                        help="puzzles of the puzzle set per size")),
    puzzle_sizes=(str, typer.Option(size_spec(_default(PuzzleSetConfig, "sizes")),
                                    help="puzzle set sizes: 3-7 or 3,5,7")),
    puzzle_seed=(int, typer.Option(_default(PuzzleSetConfig, "seed"),
                                   help="puzzle set seed (evaluation's held-out seed by default)")),
)
GENERATION_OPTIONS = OptionGroup(
    GenerationConfig,
    max_new_tokens=(int, typer.Option(_default(GenerationConfig, "max_new_tokens"), min=1,
                                      help="response length limit of the puzzle-set generations")),
    temperature=(float, typer.Option(_default(GenerationConfig, "temperature"), min=0.0, help="0 = greedy")),
    top_p=(float, typer.Option(_default(GenerationConfig, "top_p"))),
    top_k=(int, typer.Option(_default(GenerationConfig, "top_k"), min=0)),
    prompt_style=(str, typer.Option(_default(GenerationConfig, "prompt_style"),
                                    help="chat, or raw (pre-filled <think>)")),
    batch_size=(int, typer.Option(_default(GenerationConfig, "batch_size"), min=1, help="generation batch size")),
)


@dataclass(frozen=True)
class HarnessConfig:
    puzzles: PuzzleSetConfig = field(default_factory=PuzzleSetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    device: str = "auto"       # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"        # auto | float32 | bfloat16 | float16


_PUZZLE_SETS: dict[PuzzleSetConfig, list[Puzzle]] = {}


def puzzle_set(config: PuzzleSetConfig = PuzzleSetConfig()) -> list[Puzzle]:
    """The puzzles of the puzzle set, ordered by size (deterministic for the config)."""
    from train.evaluate import heldout_puzzles

    if config not in _PUZZLE_SETS:
        _PUZZLE_SETS[config] = heldout_puzzles(config.sizes, config.per_size, config.seed,
                                               fixed_cast=config.fixed_cast)
    return list(_PUZZLE_SETS[config])


# --------------------------------------------------------------------------- selection

# --------------------------------------------------------------------------- loading

def load_model(path: str | Path, *, ckpt_id: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load an HF folder through nnsight (eager attention, so attention probabilities are
    readable); returns (TransformersModel, tokenizer).

    The folder is checked and its tokenizer read by `train.models`, the project's one loader;
    a problem is a one-line ModelLoadError naming the checkpoint."""
    from nnsight import TransformersModel

    from train.models import check_tokenizer_fits, load_tokenizer, pick_device, pick_dtype, vocab_problem

    path = Path(path)
    name = ckpt_id or str(path)
    tokenizer = load_tokenizer(path, name)
    check_tokenizer_fits(path, tokenizer, name)
    device = pick_device(device)
    kwargs = {"device_map": device} if device != "cpu" else {}
    try:
        lm = TransformersModel(str(path), tokenizer=tokenizer, task="text-generation", dispatch=True,
                               attn_implementation="eager", dtype=pick_dtype(dtype, device), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{name}: cannot load the weights from {path} ({first_line(exc)})") from None
    problem = vocab_problem(lm._module.get_input_embeddings().weight.shape[0], len(tokenizer))
    if problem:
        del lm
        release_memory()
        raise ModelLoadError(f"{name}: {problem}")
    lm._module.eval()
    return lm, tokenizer


def release_memory() -> None:
    """Collect a dropped model now (the caller must hold no reference to it)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of everything that decides token ids (vocabulary, merges, normalization,
    added tokens, chat template), equal for equal tokenizers across checkpoints."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([getattr(tokenizer, "chat_template", None), str(tokenizer.special_tokens_map)],
                       sort_keys=True, default=str)
    return hashlib.sha1((body + extra).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- plug-ins

class Analysis:
    """Base of every analysis. Subclass it, set `name` (and `title`), implement `run`, and
    decorate the class with `@register_analysis`.

    Class attributes:
      name             unique key (cache files, CLI `--analyses`)
      title            section heading in reports
      order            position of the section in a report (smaller first)
      version          bump to invalidate cached results after changing `run`
      uses_puzzles       the result depends on the puzzles of the puzzle set (`ctx.puzzles`)
      uses_generations the result depends on the puzzle-set generations (`ctx.generations`)
      uses_model       `run` needs the model (False: it only reads generations)
      by_default       part of a report without `--analyses` (False for analyses that cost many
                       forward passes or samples per checkpoint: run them by name)
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    order: ClassVar[int] = 100
    version: ClassVar[int] = 1
    uses_puzzles: ClassVar[bool] = True
    uses_generations: ClassVar[bool] = False
    uses_model: ClassVar[bool] = True
    by_default: ClassVar[bool] = True

    def params(self) -> dict:
        """The parameters that decide the result (part of the cache key)."""
        return {}

    def run(self, ctx: "AnalysisContext") -> dict:
        raise NotImplementedError

    def report_section(self, result: dict) -> tuple[str, list]:
        """Markdown and figures for one checkpoint's report. Figures are matplotlib figures
        or (caption, figure) pairs. Default: the result as a JSON block."""
        return f"```json\n{json.dumps(result, indent=1, default=str)[:4000]}\n```\n", []

    def trend_metrics(self, result: dict) -> dict[str, float]:
        """Scalars to plot over training steps in the index report, by label. A label
        `x` with companions `x@lo` and `x@hi` is drawn with that band."""
        return {}


_ANALYSES: dict[str, type[Analysis]] = {}


def register_analysis(cls: type[Analysis]) -> type[Analysis]:
    """Class decorator: make an Analysis available to the harness, the CLI and reports."""
    if not cls.name:
        raise HarnessError(f"analysis class {cls.__name__} has no name")
    if cls.name in _ANALYSES and _ANALYSES[cls.name].__qualname__ != cls.__qualname__:
        raise HarnessError(f"two analyses are named {cls.name!r}: "
                           f"{_ANALYSES[cls.name].__qualname__} and {cls.__qualname__}")
    _ANALYSES[cls.name] = cls
    return cls


def load_plugins(extra_modules: Sequence[str] = ()) -> dict[str, type[Analysis]]:
    """Import every module of the plug-in packages that registers an analysis (found by
    reading its source, so unrelated heavy modules stay unimported), plus `extra_modules`."""
    for pkg_name in PLUGIN_PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ImportError:
            continue
        for info in pkgutil.iter_modules(pkg.__path__):
            spec = info.module_finder.find_spec(info.name)
            origin = getattr(spec, "origin", None) if spec else None
            if not origin or not origin.endswith(".py") or info.name in ("harness", "__main__"):
                continue
            if "@register_analysis" in Path(origin).read_text(encoding="utf-8", errors="ignore"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    for mod in extra_modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise HarnessError(f"cannot import plug-in module {mod!r} ({first_line(exc)})") from None
    return dict(_ANALYSES)


def available_analyses() -> dict[str, type[Analysis]]:
    return dict(sorted(_ANALYSES.items(), key=lambda kv: (kv[1].order, kv[0])))


def default_analyses() -> list[str]:
    """The analyses a report runs when none are named."""
    return [name for name, cls in available_analyses().items() if cls.by_default]


def get_analysis(name: str, **options: Any) -> Analysis:
    if name not in _ANALYSES:
        load_plugins()
    if name not in _ANALYSES:
        raise HarnessError(f"unknown analysis {name!r}; available: {', '.join(available_analyses()) or 'none'}")
    cls = _ANALYSES[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise HarnessError(f"--set {name}.{unknown[0]}: {name} has no such option "
                           f"({', '.join(p for p in params if p != 'self')})")
    options = {k: _checked_option(name, k, v, params[k].default if k in params else None)
               for k, v in options.items()}
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"analysis {name!r}: bad options {sorted(options)} ({first_line(exc)})") from None


def _checked_option(analysis: str, option: str, value: Any, default: Any) -> Any:
    """An option value of the type of its default (a count may not be negative); one line otherwise."""
    where = f"--set {analysis}.{option}={value!r}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HarnessError(f"{where}: expected true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise HarnessError(f"{where}: expected an integer")
        if value < 0 and option != "seed":
            raise HarnessError(f"{where}: must be 0 or more")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HarnessError(f"{where}: expected a number")
        value = float(value)
    return value


# --------------------------------------------------------------------------- context

@dataclass
class AnalysisContext:
    """What an analysis sees for one checkpoint."""

    checkpoint: Checkpoint
    path: Path
    model: Any                   # nnsight TransformersModel; None until `require_model()` loads it
    tokenizer: Any               # loaded with the model
    puzzles: list[Puzzle]
    config: HarnessConfig
    cache: ResultCache
    fingerprint: str
    progress: Any = None         # a running rich Progress, or None
    registry: Registry | None = None   # the registry the checkpoint was selected from
    _load: Callable[[], tuple[Any, Any]] | None = None
    _generations: list[dict] | None = None

    @property
    def hf_model(self) -> Any:
        """The underlying transformers model (for plain forwards outside nnsight)."""
        return self.require_model()._module

    @property
    def device(self) -> Any:
        return next(self.hf_model.parameters()).device

    def require_model(self) -> Any:
        if self.model is None:
            if self._load is None:
                raise HarnessError(f"{self.checkpoint.id}: no model in this context")
            self.model, self.tokenizer = self._load()
        return self.model

    @property
    def generations(self) -> list[dict]:
        """One scored record per puzzle (see `generation_records`), from the cache,
        from evaluation's kept generations, or generated now (and cached)."""
        if self._generations is None:
            self._generations = load_or_generate(self)
        return self._generations

    def prompted_generations(self, records: Sequence[dict] | None = None) -> Iterator[tuple[dict, Puzzle, str]]:
        """((record, puzzle, prompt)) for each of `records` (default: all `generations`),
        the prompt rendered in the record's own prompt style."""
        from train.generate import render_prompts

        by_id = {p.id: p for p in self.puzzles}
        for rec in self.generations if records is None else records:
            p = by_id[rec["puzzle_id"]]
            style = rec.get("prompt_style", self.config.generation.prompt_style)
            yield rec, p, render_prompts(self.tokenizer, [p], style)[0]

    def shared_get_or_compute(self, analysis: str, params: dict, compute: Callable[[], Any]) -> Any:
        """A cached result shared by all checkpoints (e.g. token ids of fixed contexts):
        key it by what it depends on, e.g. `tokenizer_identity(ctx.tokenizer)`."""
        return self.cache.get_or_compute(SHARED_CACHE_ID, analysis, params, compute)


def generation_params(ck_fingerprint: str, config: HarnessConfig) -> dict:
    return {"puzzles": config.puzzles.params(), "generation": config.generation.params(),
            "weights": ck_fingerprint}


def generation_records(puzzles: Sequence[Puzzle], outs: Sequence[Any], prompt_style: str) -> list[dict]:
    """Score one output per puzzle with the training reward; JSON-able records."""
    from train.generate import prompt_reward_config
    from train.reward import score_response

    reward = prompt_reward_config(prompt_style)
    records = []
    for p, o in zip(puzzles, outs):
        o = o[0] if isinstance(o, (list, tuple)) else o
        s = score_response(o.text, p.solution_text_format, reward)
        records.append({
            "puzzle_id": p.id, "people": p.people, "names": list(p.names), "prompt_style": prompt_style,
            "text": o.text, "n_tokens": o.n_tokens, "finished": o.finished,
            "answer": s["answer"], "correct": s["answer"] == "correct", "score": s["score"],
            "format_ok": s["format_ok"],
        })
    return records


def _from_evaluation(ctx: AnalysisContext) -> list[dict] | None:
    """Evaluation's kept generations, when a cached evaluation of these very weights covered
    the puzzles of the puzzle set with the same decoding settings (its first sample per puzzle)."""
    from analysis.cache import safe_id
    from analysis.evaluate import ANALYSIS, load_generations
    from train.evaluate import EvalConfig

    g, probe = ctx.config.generation, ctx.config.puzzles
    for path in sorted((ctx.cache.root / safe_id(ctx.checkpoint.id)).glob(f"{ANALYSIS}-*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            params, summary = record["params"], record["result"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(params, dict) or not isinstance(summary, dict):
            continue
        greedy = params.get("mode") == "greedy"
        same_decoding = (greedy and g.temperature == 0) or (
            not greedy and g.temperature == params.get("temperature") and g.top_p == params.get("top_p")
            and g.top_k == params.get("top_k") and g.seed == params.get("seed"))
        if not (same_decoding and summary.get("weights") == ctx.fingerprint
                and params.get("seed") == probe.seed and params.get("external") is None
                and params.get("fixed_cast", False) == probe.fixed_cast
                and params.get("train_data") is None and params.get("max_new_tokens") == g.max_new_tokens
                and params.get("prompt_style") == g.prompt_style
                and params.get("n_per_size", 0) >= probe.per_size
                and set(probe.sizes) <= set(params.get("people", ()))):
            continue
        try:
            frame = load_generations(ctx.cache, ctx.checkpoint.id, EvalConfig(**params))
        except (UserError, ValueError):
            continue
        rows = {r["puzzle_id"]: r for r in frame[frame["sample"] == 0].to_dict("records")}
        if not all(p.id in rows for p in ctx.puzzles):
            continue
        return [{
            "puzzle_id": p.id, "people": p.people, "names": list(p.names), "prompt_style": g.prompt_style,
            "text": rows[p.id]["text"], "n_tokens": int(rows[p.id]["n_tokens"]),
            "finished": bool(rows[p.id]["finished"]), "answer": rows[p.id]["answer"],
            "correct": rows[p.id]["answer"] == "correct", "score": float(rows[p.id]["score"]),
            "format_ok": bool(rows[p.id]["format_ok"]), "source": "evaluation",
        } for p in ctx.puzzles]
    return None


def load_or_generate(ctx: AnalysisContext) -> list[dict]:
    from train.generate import generate, render_prompts

    params = generation_params(ctx.fingerprint, ctx.config)
    hit = ctx.cache.get(ctx.checkpoint.id, GENERATIONS, params)
    if (isinstance(hit, list) and len(hit) == len(ctx.puzzles)
            and all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in hit)):
        return hit                         # anything else in the file counts as missing
    records = _from_evaluation(ctx)
    if records is None:
        g = ctx.config.generation
        ctx.require_model()
        prompts = render_prompts(ctx.tokenizer, ctx.puzzles, g.prompt_style)
        outs = generate(ctx.hf_model, ctx.tokenizer, prompts, max_new_tokens=g.max_new_tokens,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, num_samples=1,
                        batch_size=g.batch_size, seed=g.seed,
                        progress=ctx.progress if ctx.progress is not None else False)
        records = generation_records(ctx.puzzles, outs, g.prompt_style)
    ctx.cache.put(ctx.checkpoint.id, GENERATIONS, params, records)
    return records


# --------------------------------------------------------------------------- running

@dataclass
class CheckpointOutcome:
    checkpoint: Checkpoint
    results: dict[str, dict] = field(default_factory=dict)   # analysis name -> result
    computed: list[str] = field(default_factory=list)        # names computed in this run
    error: str | None = None                                  # one line, when it failed


def analysis_params(analysis: Analysis, fingerprint: str, config: HarnessConfig) -> dict:
    """The cache key parameters of one analysis on one checkpoint."""
    params = {"params": analysis.params(), "version": analysis.version, "weights": fingerprint}
    if analysis.uses_puzzles or analysis.uses_generations:
        params["puzzles"] = config.puzzles.params()
    if analysis.uses_generations:
        params["generation"] = config.generation.params()
    return params


def _from_cache(registry: Registry, ck: Checkpoint, analyses: Sequence[Analysis], cache: ResultCache,
                config: HarnessConfig) -> tuple[CheckpointOutcome, list[Analysis], dict, str]:
    """(outcome with the cached results, analyses still missing, cache keys, weights fingerprint)."""
    outcome = CheckpointOutcome(checkpoint=ck)
    path = registry.resolve(ck)
    if not path.is_dir():
        outcome.error = f"{ck.id}: checkpoint folder {path} does not exist"
        return outcome, [], {}, ""
    fingerprint = weights_fingerprint(path)
    keys = {a.name: analysis_params(a, fingerprint, config) for a in analyses}
    missing = []
    for a in analyses:
        hit = cache.get(ck.id, a.name, keys[a.name])
        if isinstance(hit, dict):
            outcome.results[a.name] = hit
        else:                              # missing, or a foreign file: computed again
            missing.append(a)
    return outcome, missing, keys, fingerprint


def cached_outcome(registry: Registry, ck: Checkpoint, analyses: Sequence[Analysis], *, cache: ResultCache,
                   config: HarnessConfig = HarnessConfig()) -> CheckpointOutcome | None:
    """The outcome of `analyses` on `ck` when every result is cached (nothing is computed), else None."""
    outcome, missing, _, _ = _from_cache(registry, ck, analyses, cache, config)
    return None if outcome.error or missing else outcome


def analyse_checkpoint(registry: Registry, ck: Checkpoint, analyses: Sequence[Analysis], *,
                       cache: ResultCache, config: HarnessConfig = HarnessConfig(),
                       progress: Any = None) -> CheckpointOutcome:
    """Run the analyses missing from the cache on one checkpoint (see module doc)."""
    outcome, missing, keys, fingerprint = _from_cache(registry, ck, analyses, cache, config)
    if outcome.error or not missing:
        return outcome
    path = registry.resolve(ck)

    ctx = AnalysisContext(checkpoint=ck, path=path, model=None, tokenizer=None,
                          puzzles=puzzle_set(config.puzzles), config=config, cache=cache,
                          fingerprint=fingerprint, progress=progress, registry=registry,
                          _load=lambda: load_model(path, ckpt_id=ck.id, device=config.device, dtype=config.dtype))
    try:
        needs_generation = any(a.uses_generations for a in missing) and _needs_generation(ctx)
        if any(a.uses_model for a in missing) or needs_generation:
            ctx.require_model()  # fail early, before anything is cached for a bad checkpoint
        for a in missing:
            result = a.run(ctx)
            cache.put(ck.id, a.name, keys[a.name], result)
            outcome.results[a.name] = result
            outcome.computed.append(a.name)
    except ModelLoadError as exc:
        outcome.error = str(exc)
    except UserError as exc:
        outcome.error = f"{ck.id}: {exc}"
    finally:
        # Drop every reference to the model before collecting, so the next one has the memory.
        ctx.model = ctx.tokenizer = ctx._load = None
        del ctx
        release_memory()
    return outcome


def _needs_generation(ctx: AnalysisContext) -> bool:
    return ctx.cache.get(ctx.checkpoint.id, GENERATIONS, generation_params(ctx.fingerprint, ctx.config)) is None


def analyse_checkpoints(registry: Registry, checkpoints: Sequence[Checkpoint], analyses: Sequence[Analysis], *,
                        cache: ResultCache, config: HarnessConfig = HarnessConfig(), progress: Any = None,
                        on_outcome: Callable[[CheckpointOutcome], None] | None = None) -> list[CheckpointOutcome]:
    """`analyse_checkpoint` over many checkpoints, in order; a bad one does not stop the rest.

    progress: a running rich Progress to add a task to (and to pass to generation), or None.
    """
    task = progress.add_task("checkpoints", total=len(checkpoints)) if progress is not None else None
    outcomes = []
    for ck in checkpoints:
        if task is not None:
            progress.update(task, description=f"analysing {ck.id}")
        outcome = analyse_checkpoint(registry, ck, analyses, cache=cache, config=config, progress=progress)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if task is not None:
            progress.advance(task)
    return outcomes


@contextlib.contextmanager
def outcome_display(console: Any, done: Callable[[CheckpointOutcome], str]) -> Iterator[tuple[Any, Callable]]:
    """A transient rich progress display on `console` for a command running `analyse_checkpoints`
    (transformers' own bars off), and an `on_outcome` callback printing one line per checkpoint:
    its error, or `<id>: <done(outcome)>`. Yields (progress, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own bars would garble the rich display
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        def note(o: CheckpointOutcome) -> None:
            if o.error:
                bar.console.print(f"[bold red]error:[/] {o.error}")
            else:
                bar.console.print(f"{o.checkpoint.id}: {done(o)}")

        yield bar, note
