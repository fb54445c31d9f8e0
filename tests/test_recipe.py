"""Recipe validation: each error class gives one line naming the key, exit code 2, nothing started."""

import pytest

from pipeline.cli import main
from pipeline.recipe import RecipeError
from pipeline.validate import load_recipe

from conftest import REPO

TINY = REPO / "recipes" / "tiny.yaml"


def errors_of(overrides, recipe=TINY):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, overrides)
    return dict(e.value.problems)


def test_tiny_and_nanbeige_recipes_are_valid():
    for name in ("tiny.yaml", "nanbeige3b.yaml"):
        recipe = load_recipe(REPO / "recipes" / name)
        assert "pretrain" in recipe.stages


def test_unknown_key_names_the_full_path():
    errors = errors_of(["stages.pretrain.phases.1.tokenz=3"])
    assert list(errors) == ["stages.pretrain.phases[1].tokenz"]
    assert "unknown key" in errors["stages.pretrain.phases[1].tokenz"]
    assert "unknown key" in errors_of(["model.hiden_size=3"])["model.hiden_size"]


def test_wrong_type():
    errors = errors_of(["stages.pretrain.global_batch_size=many"])
    assert "could not be converted to Integer" in errors["stages.pretrain.global_batch_size"]


def test_missing_value():
    errors = errors_of(["stages.pretrain.lr.warmup_tokens=???"])
    assert errors == {"stages.pretrain.lr.warmup_tokens": "missing value: this key must be set"}


def test_unknown_kind():
    errors = errors_of(["stages.prepare.kind=tokenise"])
    assert "is not a stage kind" in errors["stages.prepare.kind"]


def test_mixture_weights_must_sum_to_one():
    errors = errors_of(["stages.pretrain.phases.2.mixture.code=0.3"])
    assert errors == {"stages.pretrain.phases[2].mixture": "weights sum to 0.9, must sum to 1"}


def test_mixture_names_a_source_the_data_stage_does_not_prepare():
    errors = errors_of(["stages.pretrain.phases.0.mixture.web=0.0"])
    assert "not a source of stage 'prepare'" in errors["stages.pretrain.phases[0].mixture.web"]


def test_phase_budget_inconsistent_with_the_schedule():
    errors = errors_of(["stages.pretrain.phases.3.tokens=40500"])
    assert "near-whole number of steps" in errors["stages.pretrain.phases[3].tokens"]
    errors = errors_of(["stages.pretrain.lr.decay_tokens=500000"])
    assert "exceed the phases' total" in errors["stages.pretrain.lr.decay_tokens"]


def test_batch_sizes_below_one_are_key_errors_not_a_division_by_zero():
    # found by the recipe fuzz: global_batch_size 0 divided the phases' tokens by zero
    for recipe in (TINY, REPO / "recipes" / "nanbeige3b.yaml"):
        assert errors_of(["stages.pretrain.global_batch_size=0"], recipe) == {
            "stages.pretrain.global_batch_size": "0, must be at least 1"}
    assert errors_of(["stages.pretrain.micro_batch_size=0"]) == {
        "stages.pretrain.micro_batch_size": "0, must be at least 1"}
    assert errors_of(["stages.pretrain.phases.4.global_batch_size=-8"]) == {
        "stages.pretrain.phases[4].global_batch_size": "-8, must be at least 1"}


def test_mixture_change_outside_constant_lr():
    errors = errors_of(["stages.pretrain.lr.decay_tokens=122880"])  # decay from step 100
    assert "inside the LR decay" in errors["stages.pretrain.phases[4].mixture"]


def test_dependency_cycle(write_recipe):
    path = write_recipe("""
        name: c
        workdir: w
        stages:
          a: {kind: noop, input: c}
          b: {kind: noop, input: a}
          c: {kind: noop, after: [b]}
    """)
    errors = errors_of([], path)
    assert errors == {"stages.a": "dependency cycle: a -> c -> b -> a"}


def test_reference_to_unknown_stage_and_wrong_kind():
    errors = errors_of(["stages.pretrain.data=prep", "stages.prepare.tokenizer=prepare",
                        "stages.tokenizer.after=[nope]"])
    assert "'prep' is not a stage of this recipe" in errors["stages.pretrain.data"]
    assert "expected a tokenizer or import stage" in errors["stages.prepare.tokenizer"]
    assert "'nope' is not a stage" in errors["stages.tokenizer.after[0]"]


def test_missing_data_path(write_recipe, tmp_path):
    (tmp_path / "here.txt").write_text("x")
    path = write_recipe(f"""
        name: m
        workdir: w
        sources:
          web: {{kind: text, paths: [{tmp_path}/here.txt, {tmp_path}/gone.txt]}}
        stages:
          tok: {{kind: tokenizer, sources: [web, nosuch]}}
    """)
    errors = errors_of([], path)
    assert errors["sources.web.paths[1]"] == f"{tmp_path}/gone.txt does not exist"
    assert "'nosuch' is not a source" in errors["stages.tok.sources[1]"]


def test_cli_prints_one_line_per_problem_exits_2_and_starts_nothing(tmp_path, capsys):
    workdir = tmp_path / "wd"
    code = main(["run", str(TINY), f"workdir={workdir}", "stages.pretrain.phases.2.mixture.code=0.3",
                 "stages.tokenizer.sources=[code,web]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: stages.tokenizer.sources[1]: 'web' is not a source of this recipe "
                   "(code, prose, arithmetic)",
                   "error: stages.pretrain.phases[2].mixture: weights sum to 0.9, must sum to 1"]
    assert not workdir.exists()


def test_bad_override_syntax_and_bad_yaml(write_recipe, capsys):
    assert main(["plan", str(TINY), "stages.pretrain.seed"]) == 2
    assert "is not key=value" in capsys.readouterr().err
    path = write_recipe("name: [unclosed\n")
    assert main(["plan", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_sft_data_sft_and_eval_settings_are_checked_with_their_key_paths():
    errors = errors_of(["stages.sft_data.drafter.kind=http", "stages.sft_data.cot.kind=gpt",
                        "stages.eval_sft.k=[1,9]", "stages.sft_data.prompts.split=test"])
    assert errors == {
        "stages.sft_data.drafter.url": "the http backend needs the endpoint's base URL",
        "stages.sft_data.cot.kind": "'gpt' is not a generator backend; one of engine, http, oracle",
        "stages.sft_data.prompts.split": "'test'; one of train, heldout",
        "stages.eval_sft.k": "[9] must be between 1 and samples (4)"}
    assert errors_of(["stages.sft_data.evaluators=[]"]) == {
        "stages.sft_data.evaluators": "name at least one evaluator"}


def test_sft_and_eval_references_must_point_at_the_right_kinds():
    errors = errors_of(["stages.sft.data=prepare", "stages.eval_base.init=tokenizer",
                        "stages.sft_data.engine=prepare"])
    assert errors == {
        "stages.sft.data": "'prepare' is a prepare stage; expected a sft_data or sft_tokenize stage",
        "stages.eval_base.init": "'tokenizer' is a tokenizer stage; expected a pretrain or sft "
                                 "or distill or rl or import or postnas stage",
        "stages.sft_data.engine": "'prepare' is a prepare stage; expected a pretrain or sft or "
                                  "distill or rl or import or postnas stage"}


def test_a_recipe_extends_its_base_recipe(write_recipe, tmp_path, capsys):
    from pipeline.graph import build_graph

    child = write_recipe(f"""
        base: {TINY}
        name: tiny_child
        workdir: {tmp_path}/wd
        stages:
          pretrain: {{seed: 7}}
    """)
    base, derived = load_recipe(TINY), load_recipe(child)
    assert derived.name == "tiny_child" and derived.stages["pretrain"].seed == 7
    # everything not overridden is the base's: same stages, kinds and other settings
    assert derived.stages["pretrain"].phases == base.stages["pretrain"].phases
    assert list(build_graph(derived)) == list(build_graph(base))

    missing = write_recipe("base: nope.yaml\nname: x\n", "missing.yaml")
    assert main(["plan", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: base: base recipe {tmp_path}/nope.yaml does not exist"
    loop = write_recipe("base: loop.yaml\nname: x\n", "loop.yaml")
    assert main(["plan", str(loop)]) == 2
    assert "a cycle" in capsys.readouterr().err


def test_an_unset_environment_variable_is_a_one_line_error_naming_its_key(write_recipe, tmp_path,
                                                                        capsys, monkeypatch):
    recipe = write_recipe(f"""
        base: {TINY}
        workdir: {tmp_path}/wd
        sources:
          prose: {{kind: text, paths: ["${{oc.env:PIPELINE_TEST_CORPUS}}"]}}
    """)
    monkeypatch.delenv("PIPELINE_TEST_CORPUS", raising=False)
    assert main(["run", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == ("error: sources.prose.paths[0]: environment variable "
                                               "PIPELINE_TEST_CORPUS is not set "
                                               "(export PIPELINE_TEST_CORPUS=...)")
    assert not (tmp_path / "wd").exists()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some prose\n")
    monkeypatch.setenv("PIPELINE_TEST_CORPUS", str(corpus))
    assert load_recipe(recipe).sources["prose"].paths == [str(corpus)]


def test_the_flagship_is_the_whole_recipe_with_an_eval_after_every_training_stage(monkeypatch,
                                                                                  capsys):
    from pipeline.graph import build_graph

    graph = build_graph(load_recipe(REPO / "recipes" / "nanbeige3b.yaml"))
    kinds = [node.kind for node in graph.values()]
    for kind in ("tokenizer", "prepare", "pretrain", "sft_data", "sft_tokenize", "sft", "distill",
                 "rl", "eval", "export"):
        assert kind in kinds, kind
    assert [n for n in graph if n.startswith("rl.")] == ["rl.stem", "rl.code", "rl.align"]
    evaluated = {node.config.init for node in graph.values() if node.kind == "eval"}
    trained = {n for n, node in graph.items() if node.kind in ("pretrain", "sft", "distill", "rl")}
    assert trained <= evaluated, trained - evaluated
    assert not isinstance(graph["distill"].config.teacher, str)  # served, not held in the job
    for sub in ("stem", "code", "align"):  # the paper's filter before each RL sub-stage
        f = graph[f"rl.{sub}"].config.substages[0].filter
        assert (f.samples, f.min_pass, f.max_pass) == (16, 0.1, 0.9)

    monkeypatch.delenv("NANBEIGE_JUDGE_URL")
    assert main(["plan", str(REPO / "recipes" / "nanbeige3b.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: stages.rl.substages[2].reward.judge.url: environment variable NANBEIGE_JUDGE_URL "
        "is not set (export NANBEIGE_JUDGE_URL=...)")
