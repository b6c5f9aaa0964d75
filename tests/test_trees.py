"""Token trees (runtime tree.py; graph.py's tree form of the full graph): a verify pass also runs
the full model at the draft's likely alternatives, whose rows propose the next cycle's first
token. The chain decides the output, so greedy output must equal plain decoding token for token;
the tree graph must compute a chain as the mask graph does, bitwise, and an alternative's row as
the model computes that token at that position (up to rounding)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from conflayers_runtime import DraftConfig, GenerationError, ManifestError, SamplingConfig, TreeConfig, load
from conflayers_runtime.artifact import open_backend
from conflayers_runtime.cli import main as run_main
from conflayers_runtime.manifest import read_manifest, write_manifest
from conflayers_runtime.model import calibrated_tree
from conflayers_runtime.speculative import generate
from conflayers_runtime.tree import choose, tree_inputs

from conflayers_export.cli import main as export_main
from conflayers_export.models import load_model
from tests.helpers import DRAFT_KINDS, build
from tests.test_architectures import TESTED_ARCHITECTURES


def _prompt(seed: int, length: int = 11) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 200, length)]


def test_the_tree_graph_computes_a_chain_bitwise_as_the_mask_graph(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    assert manifest.artifacts.tree == {"full": "tree.full.onnx"} | {
        d: f"tree.paired.{d}.onnx" for d in DRAFT_KINDS
    }
    mask = open_backend(folder, manifest, "skip", "cpu", 1, weights="prepacked")
    tree = open_backend(folder, manifest, "skip", "cpu", 1, tree=True)
    assert tree.verifies_trees and not mask.verifies_trees
    prompt = _prompt(4, 13)
    # A prompt, one-token steps (the graph pads their attention rows), a verify pass, a rollback.
    for tokens, start in [(prompt, 0), (prompt[:1], 13), (prompt[2:7], 14), (prompt[7:8], 16)]:
        expected = mask.forward(tokens, start, False).copy()
        np.testing.assert_array_equal(tree.forward(tokens, start, False), expected)


@pytest.mark.parametrize("model_type", TESTED_ARCHITECTURES)
def test_an_alternative_row_is_the_model_at_its_position_seeing_its_ancestors_only(
    tiny_folder, tmp_path, model_type
):
    # A sliding window wider than the test: GroupQueryAttention bounds a row's window by its cache
    # slot, not its position, so an alternative past its position would lose a key at the window's
    # far edge (harmless to the output, docs/TOKEN_TREES.md; gemma3's tiny window is 8).
    wide = {"sliding_window": 64} if model_type == "gemma3_text" else {}
    build(tmp_path / "a", load_model(str(tiny_folder(model_type, **wide))), {}, max_seq_len=64)
    backend = open_backend(tmp_path / "a", read_manifest(tmp_path / "a"), None, "cpu", 1, tree=True)
    prompt = _prompt(5)
    pending, d1, d2, alternative = 17, 23, 31, 40  # the alternative replaces d1
    backend.forward(prompt, 0, False)
    tree_rows = backend.forward(
        [pending, d1, d2, alternative], len(prompt), False, depths=[0, 1, 2, 1]
    ).copy()
    backend.forward(prompt + [pending], 0, False)  # the cache as a plain step sees it
    step = backend.forward([alternative], len(prompt) + 1, False)[0].copy()
    np.testing.assert_allclose(tree_rows[3], step, atol=1e-4)
    # Control: as a chain row (after d2, at the next position) the same token scores otherwise.
    backend.forward(prompt, 0, False)
    chain = backend.forward([pending, d1, d2, alternative], len(prompt), False)[3]
    assert np.abs(chain - step).max() > 1e-3


@pytest.mark.parametrize("draft", list(DRAFT_KINDS))
def test_greedy_tree_speculation_equals_plain_decoding(draft_kinds_artifact, draft):
    folder, manifest = draft_kinds_artifact
    plain_backend = open_backend(folder, manifest, None, "cpu", 1)
    tree_backend = open_backend(folder, manifest, draft, "cpu", 1, tree=True)
    nodes = hits = 0
    for seed in range(3):
        prompt = _prompt(seed)
        plain, _ = generate(plain_backend, prompt, 64, draft_config=None)
        tokens, stats = generate(
            tree_backend, prompt, 64, draft_config=DraftConfig(6, 0.3), tree=TreeConfig(4, 2)
        )
        assert tokens == plain
        nodes, hits = nodes + stats.tree_nodes, hits + stats.tree_hits
    assert nodes > 0 and hits > 0, "the trees must be built and their rows used"


def test_sampled_tree_speculation_runs_through_the_tree_rows(draft_kinds_artifact):
    """Sampling's exactness with trees is proven by the chi-square test (test_sampling_cycles.py);
    here the same path runs on graphs: tree rows are verified and some proposals come from them."""
    folder, manifest = draft_kinds_artifact
    backend = open_backend(folder, manifest, "skip", "cpu", 1, tree=True)  # often rejected: corrections
    hits = 0
    for seed in range(3):
        config = SamplingConfig(temperature=0.8, top_k=50, seed=seed)
        tokens, stats = generate(
            backend, _prompt(seed), 48, config, DraftConfig(6, 0.3), tree=TreeConfig(4, 2)
        )
        assert len(tokens) == 48 and stats.tree_nodes > 0
        hits += stats.tree_hits
    assert hits > 0


def test_load_with_trees_generates_the_plain_text(draft_kinds_artifact):
    folder, _ = draft_kinds_artifact
    model = load(folder, draft="int8", tree=TreeConfig(nodes=3, width=1))
    plain = model.generate("abcdefgh", 40, chat=False, mode="plain")
    speculative = model.generate("abcdefgh", 40, chat=False, mode="speculative")
    assert speculative.token_ids == plain.token_ids and speculative.stats.tree_nodes > 0


def test_trees_over_one_paired_session_decode_as_two_sessions(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact
    paired = open_backend(folder, manifest, "skip", "cpu", 1, tree=True)  # the CPU default
    two = open_backend(folder, manifest, "skip", "cpu", 1, weights="prepacked", tree=True)
    assert paired.paired and paired.sessions[False]._model_path.endswith("tree.paired.skip.onnx")
    assert not two.paired and two.sessions[False]._model_path.endswith("tree.full.onnx")
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.9, top_k=40, seed=5)):
        one = generate(paired, _prompt(2), 40, sampling, DraftConfig(6, 0.3), tree=TreeConfig(4, 2))
        other = generate(two, _prompt(2), 40, sampling, DraftConfig(6, 0.3), tree=TreeConfig(4, 2))
        assert one[0] == other[0] and one[1].as_dict() == other[1].as_dict()
        assert one[1].tree_nodes > 0


def test_trees_need_the_tree_graph_in_the_form_asked(draft_kinds_artifact):
    folder, manifest = draft_kinds_artifact  # fp32: no capturable graphs (test_capturable.py has them)
    with pytest.raises(ManifestError, match="no capturable graphs for tree.full and skip"):
        open_backend(folder, manifest, "skip", "cpu", 1, capturable=True, tree=True)
    older = dataclasses.replace(manifest, artifacts=dataclasses.replace(manifest.artifacts, tree={}))
    with pytest.raises(ManifestError, match="no tree graph.*rebuild"):
        open_backend(folder, older, "skip", "cpu", 1, tree=True)
    chain_backend = open_backend(folder, manifest, "skip", "cpu", 1)
    with pytest.raises(GenerationError, match="tree=True"):
        generate(chain_backend, _prompt(0), 8, tree=TreeConfig())


def test_alternatives_are_chosen_by_the_chance_that_they_are_the_correction():
    # Draft confidences of d1, d2, d3 and their runners-up (token, probability).
    confidences = [0.9, 0.5, 0.4]
    offers = [[(7, 0.08)], [(8, 0.3), (9, 0.1)], [(10, 0.35)]]
    # Scores: 7: 0.08; 8: 0.9 * 0.3 = 0.27; 9: 0.09; 10: 0.9 * 0.5 * 0.35 = 0.1575.
    chosen = choose(confidences, offers, nodes=3)
    assert [(a.depth, a.token) for a in chosen] == [(2, 8), (2, 9), (3, 10)]
    assert [a.token for a in choose(confidences, offers, nodes=1)] == [8]


def test_tree_inputs_hide_the_chain_after_an_alternatives_parent():
    positions, bias = tree_inputs([0, 1, 2, 1, 2], start=3, dtype=np.float32)
    np.testing.assert_array_equal(positions, [[3, 4, 5, 4, 5]])
    hidden = bias[0, 0] < -1e30
    assert not hidden[:3].any()  # chain rows: only the causal mask applies
    assert hidden[3].tolist() == [False] * 4 + [True, True] + [False] * 2  # hides d1, d2
    assert hidden[4].tolist() == [False] * 5 + [True, True, False]  # hides d2 and the alternative of d1


def test_load_decodes_with_the_tree_calibrate_chose(draft_kinds_artifact, tmp_path):
    folder, manifest = draft_kinds_artifact
    copy = tmp_path / "a"
    shutil.copytree(folder, copy)
    chosen = dataclasses.replace(manifest.draft("int8"), tree_nodes=3, tree_width=1)
    edited = dataclasses.replace(
        manifest, drafts=[chosen if d.name == "int8" else d for d in manifest.drafts]
    )
    write_manifest(edited, copy)
    model = load(copy, draft="int8")
    assert model.tree == TreeConfig(3, 1) and load(copy, draft="int8", tree=False).tree is None
    plain = model.generate("abcdefgh", 40, chat=False, mode="plain")
    speculative = model.generate("abcdefgh", 40, chat=False, mode="speculative")
    assert speculative.token_ids == plain.token_ids and speculative.stats.tree_nodes > 0
    # CUDA captures its graphs by default where the artifact has them, this fp32 one has none.
    assert calibrated_tree(edited, "int8", "cuda", None) == TreeConfig(3, 1)
    assert calibrated_tree(edited, "int8", "cpu", True) is None  # captured: needs capturable.tree.full
    assert calibrated_tree(edited, "skip", "cpu", None) is None  # calibrated as a chain


def test_generate_with_trees_from_both_command_lines(draft_kinds_artifact, capsys):
    folder, _ = draft_kinds_artifact
    common = ["--prompt", "abcdefgh", "--no-chat", "--mode", "speculative", "--draft", "skip"]
    common += ["--max-new-tokens", "24", "--json"]
    results = {}
    for name, runner, extra in [
        ("export tree", export_main, ["--tree", "3"]),
        ("export chain", export_main, ["--tree", "0"]),
        ("run tree", run_main, ["--tree", "3"]),
    ]:
        argv = (["generate"] if runner is export_main else []) + [str(folder), *common, *extra]
        assert runner(argv) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["export tree"]["tree"]["nodes"] > 0 and results["run tree"]["tree"]["nodes"] > 0
    assert results["export chain"]["tree"]["nodes"] == 0
    assert len({r["text"] for r in results.values()}) == 1  # the same greedy text


def test_alternatives_fill_the_padding_rows_of_a_device_that_pads_passes(draft_kinds_artifact):
    """CUDA pads every pass after the prompt to one row count (row invariance): a tree must not
    make a longer pass there; its alternatives take the padding rows' place."""
    folder, manifest = draft_kinds_artifact
    backend = open_backend(folder, manifest, "skip", "cpu", 1, tree=True)
    backend.full_pass_rows = backend.max_full_pass_rows = 6  # as on CUDA (16 there)
    rows = []
    greedy = backend.greedy

    def counting(token_ids, start, use_draft, depths=None):
        if not use_draft and start > 0:
            rows.append(len(token_ids))
        return greedy(token_ids, start, use_draft, depths)

    backend.greedy = counting
    prompt = _prompt(1)
    tokens, stats = generate(backend, prompt, 48, draft_config=DraftConfig(3, 0.0), tree=TreeConfig(4, 2))
    assert max(rows) <= 6 and stats.tree_nodes > 0
    assert tokens == generate(backend, prompt, 48, draft_config=None)[0]
