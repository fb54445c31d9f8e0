"""Stage graph: content hashes, what an override invalidates, dependency order."""

from pipeline.graph import build_graph
from pipeline.validate import load_recipe

from conftest import REPO

TINY = REPO / "recipes" / "tiny.yaml"


def hashes(*overrides):
    return {n: node.hash for n, node in build_graph(load_recipe(TINY, list(overrides))).items()}


def test_hash_is_stable_and_dirs_are_name_dash_hash8():
    graph = build_graph(load_recipe(TINY))
    assert list(graph) == ["tokenizer", "prepare", "pretrain", "eval_base", "sft_data", "sft",
                           "eval_sft", "teacher_pretrain", "teacher_sft", "eval_teacher", "distill",
                           "eval_distill", "rl.stem", "rl.code", "rl.align", "eval_rl_stem",
                           "eval_code_before", "eval_code_after", "eval_rl"]
    assert hashes() == hashes()
    for name, node in graph.items():
        assert node.output_dir.name == f"{name}-{node.hash[:8]}"


def test_override_reruns_the_stage_and_its_downstream_only():
    base = hashes()
    after_sft = ["distill", "eval_distill", "rl.stem", "rl.code", "rl.align", "eval_rl_stem",
                 "eval_code_before", "eval_code_after", "eval_rl"]
    # the student's pretraining feeds SFT data, hence the teacher's SFT too (not its pretraining)
    after_pretrain = ["pretrain", "eval_base", "sft_data", "sft", "eval_sft", "teacher_sft",
                      "eval_teacher"] + after_sft
    changed = hashes("stages.pretrain.phases.2.tokens=49152")
    assert [n for n in base if base[n] != changed[n]] == after_pretrain
    everything_but_the_data = after_pretrain[:5] + ["teacher_pretrain"] + after_pretrain[5:]
    changed = hashes("stages.tokenizer.vocab_size=1024")
    assert [n for n in base if base[n] != changed[n]] == ["tokenizer", "prepare"] + \
        everything_but_the_data
    changed = hashes("sources.arithmetic.num_docs=100")  # read by tokenizer and prepare
    assert [n for n in base if base[n] != changed[n]] == ["tokenizer", "prepare"] + \
        everything_but_the_data
    changed = hashes("model.num_layers=3")  # the student; the teacher sets its own num_layers
    assert [n for n in base if base[n] != changed[n]] == after_pretrain
    changed = hashes("stages.sft.epochs=1")  # the student's SFT and what comes after it
    assert [n for n in base if base[n] != changed[n]] == ["sft", "eval_sft"] + after_sft


def test_fields_that_do_not_change_outputs_do_not_change_the_hash():
    base = hashes()
    assert hashes("stages.pretrain.log_every=1", "stages.pretrain.checkpoint_every=7",
                  "stages.prepare.docs_per_task=64", "stages.pretrain.launcher={nproc_per_node: 2}",
                  "launcher.nproc_per_node=2", "workdir=runs/tiny") == base


def test_a_new_source_option_at_its_default_keeps_every_hash():
    base = hashes()
    assert hashes('sources.arithmetic.ops="+-*"') == base  # `ops` came after runs existed
    changed = hashes('sources.arithmetic.ops="+-"')
    assert changed["prepare"] != base["prepare"] and changed["tokenizer"] != base["tokenizer"]


def test_edges_hash_by_upstream_content_not_name(write_recipe):
    a = write_recipe("""
        name: x
        workdir: w
        stages:
          first: {kind: noop, seconds: 1}
          second: {kind: noop, input: first}
    """, "a.yaml")
    b = write_recipe("""
        name: x
        workdir: w
        stages:
          renamed: {kind: noop, seconds: 1}
          second: {kind: noop, input: renamed}
    """, "b.yaml")
    ga, gb = build_graph(load_recipe(a)), build_graph(load_recipe(b))
    assert ga["second"].hash == gb["second"].hash



def test_only_and_until_select_stages_with_what_they_need():
    import pytest

    from pipeline.graph import select_stages
    from pipeline.recipe import RecipeError

    graph = build_graph(load_recipe(TINY))
    only = select_stages(graph, only=["eval_sft"])
    assert list(only) == ["tokenizer", "prepare", "pretrain", "sft_data", "sft", "eval_sft"]
    assert list(select_stages(graph, until="sft")) == ["tokenizer", "prepare", "pretrain",
                                                       "eval_base", "sft_data", "sft"]
    # both: the stages in both selections (eval_teacher needs the student's sft_data, not its
    # sft); the selection keeps graph order
    assert list(select_stages(graph, only=["eval_teacher", "eval_base"], until="sft")) == [
        "tokenizer", "prepare", "pretrain", "eval_base", "sft_data"]
    with pytest.raises(RecipeError, match="--only: no stage named 'sfty'"):
        select_stages(graph, only=["sfty"])
    with pytest.raises(RecipeError, match="--until: no stage named 'nope'"):
        select_stages(graph, until="nope")
