"""The offline ConfLayers search with a cost-aware choice and baselines (what ``calibrate`` runs).

Iteration t evaluates the current skip set with the reference self-speculative decoder on
calibration prompt t (cycling through the prompts) for ``search_interval`` verify cycles, then
scores the layers on the text generated so far (the last ``context_window`` tokens) and derives
the next set with the adaptive threshold; lambda moves the skip ratio toward ``skip_ratio``.
Greedy decoding is lossless, so the generated text does not depend on the skip set: the search
is deterministic for a given model, data and settings.

The search tracks acceptance, but ships by expected speedup: the best few sets it found are
re-scored on a common evaluation slice, next to baselines scored the same way (the ConfLayers
start set, LayerSkip-style early exits, random sets of the same size).

``search="published"`` runs the same loop under the reference's outer-loop rules (a
:class:`SearchPolicy`): a minimum set size reached by stepping lambda, early abandon of sets that
accept under one token per cycle at half the interval, block outputs clamped before the entropy,
and the set with the most accepted tokens per cycle restored at the end. ``"both"`` runs the two
and reports them side by side; the cost-aware choice ships.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from conflayers_runtime import DraftConfig, GenerationStats
from conflayers_runtime.manifest import SkipPlan
from conflayers_runtime.speculative import expected_speedup, stream

from ..models import LoadedModel
from ..models.reference import TorchBackend
from ..progress import Progress
from .confidence import adapt_lambda, profile_blocks, ranked_blocks, select_at_least
from .settings import CalibrationSettings, Candidate, TaskResult

# Scores (origin, skip set) pairs on the common evaluation slice (scoring.score_layer_sets)
SetScorer = Callable[[list[tuple[str, list[int | str]]]], list[Candidate]]


@dataclass(frozen=True)
class SearchPolicy:
    """What distinguishes the reference's outer loop from ours (CONFLAYERS.md, "Rules of the
    reference's loop"); the default is the cost-aware search, which applies none of them."""

    name: str = "cost-aware"
    min_size: int = 0  # smaller selections are redone with the next lambda step (0: any size)
    max_size_steps: int = 40  # lambda steps tried for min_size (2.0 in all) before evaluating anyway
    abandon_below: float | None = None  # mean accepted tokens per cycle at half the interval
    clamp: bool = False  # block outputs clamped to [log(tiny float32), 88.7] before the entropy

    @classmethod
    def published(cls, eligible: int, skip_ratio: float) -> SearchPolicy:
        return cls("published", min_size=int(eligible * skip_ratio) + 1, abandon_below=1.0, clamp=True)


def abandon_early(accepted: int, cycles: int, below: float | None) -> bool:
    """The reference's early abandon, checked once at half of the search interval."""
    return below is not None and accepted / max(cycles, 1) < below


def best_set(iterations: Sequence[dict[str, object]]) -> list[int]:
    """The set with the most accepted tokens per cycle (the first on ties): what the reference
    restores when its iterations run out."""
    best = max(iterations, key=lambda r: float(r["accepted_per_cycle"]))  # type: ignore[arg-type]
    return list(best["skip"])  # type: ignore[call-overload]


class Calibrator:
    def __init__(
        self,
        loaded: LoadedModel,
        settings: CalibrationSettings,
        progress: Progress | None = None,
    ):
        self.loaded = loaded
        self.settings = settings
        self.progress = progress or Progress()
        # The PyTorch reference of the search (on the GPU in float16 with --reference-device cuda)
        self.reference = loaded.reference_model(
            settings.reference_device, settings.reference_dtype, settings.device_map
        )
        self.num_layers = loaded.identity.num_layers
        self.eligible = list(range(1, self.num_layers - 1))
        self.draft_config = DraftConfig(settings.max_draft_tokens, settings.confidence_threshold)
        self._layer_bytes, self._head_bytes = self._weight_bytes()

    # -- costs ---------------------------------------------------------------------------------
    def _weight_bytes(self) -> tuple[list[dict[str, int]], int]:
        """Per layer the bytes of its attention and MLP blocks and of the whole layer; the head's."""

        def size(module: Any) -> int:
            return sum(p.numel() * p.element_size() for p in module.parameters())

        arch = self.loaded.architecture
        per_layer = []
        for layer in arch.decoder_layers(self.loaded.model):
            attention, mlp = arch.blocks(layer)
            per_layer.append({"attention": size(attention), "mlp": size(mlp), "layer": size(layer)})
        head = self.loaded.model.lm_head.weight
        return per_layer, head.numel() * head.element_size()

    def cost(self, skip: Sequence[int | str]) -> tuple[float, float]:
        """(c_draft, c_verify) relative to one full-model decoding step: the share of the weight
        bytes a layer- or block-skipped draft reads (the joint stage then times the real graphs)."""
        plan = SkipPlan.of(list(skip))
        kept = sum(b["layer"] for i, b in enumerate(self._layer_bytes) if i not in plan.layers)
        kept -= sum(self._layer_bytes[i]["attention"] for i in plan.attention)
        kept -= sum(self._layer_bytes[i]["mlp"] for i in plan.mlp)
        full = sum(b["layer"] for b in self._layer_bytes) + self._head_bytes
        return (kept + self._head_bytes) / full, 1.0

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(
        self,
        skip: Sequence[int | str],
        prompts: Sequence[list[int]],
        max_cycles: int | None = None,
        abandon_below: float | None = None,
    ) -> tuple[GenerationStats, list[list[int]], bool]:
        """Greedy speculative decoding of each prompt (until ``max_cycles`` verify passes in all).
        Returns summed stats, each prompt + its generated tokens, and whether the set was abandoned
        (under ``abandon_below`` accepted tokens per cycle at half of ``max_cycles``)."""
        total = GenerationStats()
        texts = []
        half = max((max_cycles or 0) // 2, 1)
        checked = abandon_below is None or max_cycles is None
        backend = TorchBackend(self.reference, self.loaded.architecture, skip)
        for prompt in prompts:
            stats = GenerationStats()
            generated: list[int] = []
            for chunk in stream(
                backend,
                prompt,
                self.settings.max_new_tokens,
                draft_config=self.draft_config,
                stop_token_ids=self.loaded.stop_token_ids,
                stats=stats,
            ):
                generated.extend(chunk)
                passes = total.verify_passes + stats.verify_passes
                if not checked and passes >= half:
                    checked = True
                    cycles = total.cycles + stats.cycles
                    if abandon_early(total.accepted_tokens + stats.accepted_tokens, cycles, abandon_below):
                        total.merge(stats)
                        texts.append([*prompt, *generated])
                        return total, texts, True
                if max_cycles is not None and passes >= max_cycles:
                    break
            total.merge(stats)
            texts.append([*prompt, *generated])
            if max_cycles is not None and total.verify_passes >= max_cycles:
                break
        return total, texts, False

    # -- the search ----------------------------------------------------------------------------
    def run(self, task: str, prompts: Sequence[list[int]], scorer: SetScorer) -> TaskResult:
        """The search(es) on ``prompts``; ``scorer`` scores their sets and the baselines on the
        common evaluation slice (on built graphs: scoring.score_layer_sets)."""
        started = time.perf_counter()
        s = self.settings
        result = TaskResult(
            task, Candidate(skip=[], origin=""), False, finalists=[], baselines=[], search=s.search
        )
        sets: list[tuple[str, list[int | str]]] = []
        if s.search != "published":
            result.iterations, all_scores, result.profile, _ = self._search(task, prompts, SearchPolicy())
            mean_scores = np.mean(all_scores, axis=0) if all_scores else np.zeros(len(self.eligible))
            sets = self._finalist_sets(result.iterations, mean_scores)
        if s.search != "cost-aware":
            policy = SearchPolicy.published(len(self.eligible), s.skip_ratio)
            iterations, _, profile, stopped = self._search(task, prompts, policy)
            result.published_iterations = iterations
            best = stopped if stopped is not None else best_set(iterations)
            sets.append(("conflayers (published loop)", best))
            if s.search == "published":
                result.iterations, result.profile = iterations, profile
        scored = scorer(sets)
        if s.search != "cost-aware":
            result.published = scored.pop()
        result.finalists = scored or [result.published]  # type: ignore[list-item]
        result.chosen = max(result.finalists, key=lambda c: c.expected_speedup)
        result.recommended = result.chosen.expected_speedup > 1.0
        if s.baselines:
            result.baselines = scorer(self._baseline_sets(result.chosen))
            result.conflayers_beats_baselines = bool(result.beats_baselines)
        result.seconds = time.perf_counter() - started
        return result

    def _search(
        self, task: str, prompts: Sequence[list[int]], policy: SearchPolicy
    ) -> tuple[list[dict[str, object]], list[np.ndarray], dict[str, list[float]], list[int] | None]:
        """The search loop: (iteration records, each iteration's scores, the first profile, the
        set that met the paper's stop rule or None)."""
        s = self.settings
        lam = 0.0
        current = self.eligible[::2]  # start set: every other eligible layer
        iterations: list[dict[str, object]] = []
        profile: dict[str, list[float]] = {}
        all_scores: list[np.ndarray] = []
        note: dict[str, object] = {}
        label = task if policy.name == "cost-aware" else f"{task}, {policy.name}"
        with self.progress.phase(f"[{label}] layer search", s.max_iter) as step:
            for it in range(s.max_iter):
                rotated = [*prompts[it % len(prompts) :], *prompts[: it % len(prompts)]]
                stats, texts, abandoned = self.evaluate(
                    current, rotated, max_cycles=s.search_interval, abandon_below=policy.abandon_below
                )
                record = self._iteration_record(it, lam, current, stats, abandoned, note, label)
                iterations.append(record)
                accepted_per_cycle = float(record["accepted_per_cycle"])  # type: ignore[arg-type]
                if not abandoned and accepted_per_cycle > 4 and stats.acceptance_rate > 0.95:
                    return iterations, all_scores, profile, record["skip"]  # type: ignore[return-value]
                window = texts[0][-s.context_window :] if len(texts[0]) > s.context_window else texts[0]
                blocks = profile_blocks(
                    self.reference, self.loaded.architecture, texts[0], len(window), policy.clamp
                )
                record["block_confidence"] = blocks.tolist()  # [layers 1..L-2, (attention, MLP)]
                scores = blocks.sum(axis=1)
                chosen, lam, steps = select_at_least(
                    scores,
                    self.num_layers,
                    lam,
                    policy.min_size,
                    self.loaded.architecture.caps_confidence_window,
                    max_steps=policy.max_size_steps,
                )
                note = {"lambda_steps": steps} if steps else {}
                if len(chosen["skip"]) < policy.min_size:
                    note["below_min_size"] = True
                    self.progress.log(
                        f"[{label}] {steps} lambda steps left the set below {policy.min_size} layers: "
                        "evaluating it anyway"
                    )
                all_scores.append(chosen["scores"])
                if not profile:
                    profile = {k: np.asarray(v, dtype=float).tolist() for k, v in chosen.items()}
                    profile["raw_scores"] = scores.tolist()
                current = [int(i) for i in chosen["skip"]]
                lam = adapt_lambda(lam, len(current), len(self.eligible), s.skip_ratio)
                step()
        return iterations, all_scores, profile, None

    def _iteration_record(
        self,
        it: int,
        lam: float,
        current: list[int],
        stats: GenerationStats,
        abandoned: bool,
        note: dict[str, object],
        label: str,
    ) -> dict[str, object]:
        """What one search iteration found for its set (logged, and kept in search.json)."""
        c_draft, c_verify = self.cost(current)
        accepted_per_cycle = stats.accepted_tokens / max(stats.cycles, 1)
        self.progress.log(
            f"[{label}] iteration {it}: {len(current)} layers skipped, lambda {lam:+.2f}, "
            f"acceptance {stats.acceptance_rate:.2f}, {accepted_per_cycle:.2f} accepted/cycle"
            + (" (abandoned at half the interval)" if abandoned else "")
        )
        return {
            "iteration": it,
            "lambda": round(lam, 4),
            "skip": [int(i) for i in current],
            "accepted_per_cycle": accepted_per_cycle,
            "acceptance_rate": stats.acceptance_rate,
            "expected_speedup": expected_speedup(
                stats.mean_tokens_per_cycle, stats.draft_passes_per_cycle, c_draft, c_verify
            ),
            **note,
            **({"abandoned": True} if abandoned else {}),
        }

    def _finalist_sets(
        self, iterations: list[dict[str, object]], mean_scores: np.ndarray
    ) -> list[tuple[str, list[int | str]]]:
        """The search's distinct sets with the best expected speedup during the search, to re-score
        on the common evaluation slice (the search intervals are short and differ in text).

        Our extension: the paper's threshold only explores sets near the target ratio (~40% of the
        layers), which small models cannot afford. We also score the k least confident layers
        (by the scores averaged over all iterations) for a few small k: the same confidence
        signal, at sizes where a small model may still gain."""
        seen: dict[tuple[int, ...], dict[str, object]] = {}
        for record in iterations[1:] or iterations:  # iteration 0 is the start set (a baseline)
            key = tuple(record["skip"])  # type: ignore[arg-type]
            if key and key not in seen:
                seen[key] = record
        ranked = sorted(seen, key=lambda k: (-float(seen[k]["expected_speedup"]), k))  # type: ignore[arg-type]
        sets = [
            ("conflayers", list(k)) for k in ranked[: self.settings.finalists] or [tuple(self.eligible[::2])]
        ]
        order = np.argsort(mean_scores, kind="stable")  # least confident first
        for k in self.settings.ranked_sizes:
            if k < len(self.eligible):
                sets.append((f"confidence-ranked (k={k})", sorted(self.eligible[i] for i in order[:k])))
        # The same at the granularity of blocks (SWIFT skips attention and MLP apart): the k least
        # confident blocks, from each block's confidence averaged over the iterations.
        profiled = [r["block_confidence"] for r in iterations if "block_confidence" in r]
        if profiled:
            block_scores = np.mean(np.asarray(profiled, dtype=float), axis=0)
            for k in (k for k in self.settings.ranked_sizes if k < 2 * len(self.eligible)):
                units = ranked_blocks(block_scores, k)
                if any(isinstance(u, str) for u in units):  # whole layers only: the layer sets cover those
                    sets.append((f"confidence-ranked blocks (k={k})", units))
        return sets

    def _baseline_sets(self, chosen: Candidate) -> list[tuple[str, list[int]]]:
        """The ConfLayers start set, LayerSkip-style early exits and random sets of the chosen size."""
        size = max(len(chosen.skip), 1)
        last = self.num_layers - 2  # the final layer (L-1) is never skipped
        sets: list[tuple[str, list[int]]] = [("start set", self.eligible[::2])]
        for n in sorted({max(1, size // 2), size}):
            sets.append((f"early exit (last {n})", list(range(last - n + 1, last + 1))))
        rng = np.random.default_rng(self.settings.seed)
        for k in range(3):
            sets.append(
                (f"random #{k + 1}", sorted(int(i) for i in rng.choice(self.eligible, size, replace=False)))
            )
        return sets
