"""Recipe parsing and validation: real YAML files, no model loaded."""

import pytest
from conftest import RECIPES, cli

from compress.errors import PlanError, RecipeError
from compress.pipeline import plan
from compress.recipe import load_recipe


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.passes, "a shipped recipe does something"
    plan(recipe.passes)
    result = cli("validate", path)
    assert result.exit_code == 0, result.output


def test_typo_in_pass_option_names_file_line_and_suggestion(write_recipe):
    path = write_recipe("name: t\npasses:\n  - type: rtn\n    bitz: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert f"{path}:4:" in e.value.message and "bitz" in e.value.message
    assert e.value.hint == "did you mean 'bits'?"


def test_typo_in_section_key(write_recipe):
    path = write_recipe("evaluate:\n  max_window: 3\npasses: [{type: rtn}]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert ":2:" in e.value.message and e.value.hint == "did you mean 'max_windows'?"


def test_unknown_top_level_section(write_recipe):
    path = write_recipe("budget:\n  max_size_mb: 3\npasses: [{type: rtn}]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.hint == "did you mean 'budgets'?"


def test_unknown_pass_type_suggests(write_recipe):
    path = write_recipe("passes:\n  - type: rnt\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert ":2:" in e.value.message and e.value.hint == "did you mean 'rtn'?"


@pytest.mark.parametrize("option, needle", [("bits: 1", "bits"), ("bits: 9", "bits"), ("group_size: 0", "group_size"),
                                            ("grid: fp4\n    bits: 3", "fp4")])
def test_bad_option_values_are_rejected(write_recipe, option, needle):
    path = write_recipe(f"passes:\n  - type: rtn\n    {option}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert needle in e.value.message


def test_bad_override_value_is_rejected_before_running(write_recipe):
    path = write_recipe("passes:\n  - type: rtn\n    overrides:\n      '*.down_proj': {bits: 1}\n")
    with pytest.raises(RecipeError):
        load_recipe(path)


def test_set_overrides_values(write_recipe):
    path = write_recipe("passes:\n  - type: rtn\n    bits: 4\n")
    recipe = load_recipe(path, ["passes.0.bits=3", "evaluate.max_windows=2", "budgets.max_size_mb=50.5"])
    assert recipe.passes[0].bits == 3 and recipe.evaluate.max_windows == 2 and recipe.budgets.max_size_mb == 50.5
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["passes.0.bits=1"])
    assert e.value.message.startswith("--set")
    with pytest.raises(RecipeError):
        load_recipe(path, ["passes.3.bits=2"])


def test_invalid_yaml_and_missing_file(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match=":3: not valid YAML"):
        load_recipe(write_recipe("passes:\n  - type: rtn\n  bits: [\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_layer_targeting_and_overrides(write_recipe):
    path = write_recipe("passes:\n  - type: rtn\n    bits: 4\n    exclude: ['*.k_proj']\n"
                        "    overrides:\n      '*.down_proj': {bits: 8, group_size: 64}\n")
    cfg = load_recipe(path).passes[0]
    assert cfg.applies_to("model.layers.0.mlp.down_proj") and not cfg.applies_to("model.layers.0.self_attn.k_proj")
    down = cfg.for_layer("model.layers.0.mlp.down_proj")
    assert (down.bits, down.group_size) == (8, 64)
    assert cfg.for_layer("model.layers.0.mlp.up_proj").bits == 4


def test_recipe_hash_is_stable_and_sensitive(write_recipe):
    path = write_recipe("passes:\n  - type: rtn\n")
    assert load_recipe(path).digest() == load_recipe(path).digest()
    assert load_recipe(path).digest() != load_recipe(path, ["passes.0.bits=3"]).digest()


def test_pass_order_is_checked_before_compute():
    from compress.passes.base import PassConfig
    from compress.passes.registry import PASSES, register
    from compress.pipeline import Pass

    class FakePrune(Pass):
        """Stands in for a pruning pass to check stage ordering."""
        name, stage, Config = "test-prune", "prune", PassConfig

    register(FakePrune)
    try:
        with pytest.raises(PlanError, match="cannot follow"):
            plan([load_cfg("rtn"), PassConfig(type="test-prune")])
    finally:
        PASSES.pop("test-prune")


def load_cfg(name):
    from compress.passes.registry import get_pass

    return get_pass(name).Config(type=name)


@pytest.mark.parametrize("option, needle", [
    ("target_bits_per_weight: 1.5", "below the smallest candidate"),
    ("type: gptq\n    damp: 0", "damp"),
    ("type: gptq\n    bits: 1", "bits"),
])
def test_bad_quantization_options_are_rejected(write_recipe, option, needle):
    body = option if option.startswith("type") else f"type: rtn\n    {option}"
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(f"passes:\n  - {body}\n"))
    assert needle in e.value.message


def test_awq_without_a_quantization_pass_is_a_plan_error(write_recipe):
    recipe = load_recipe(write_recipe("passes:\n  - type: awq\n"))
    with pytest.raises(PlanError, match="awq needs"):
        plan(recipe.passes)


RENAMED = [("awq", "group_size", 64, "search_group_size"), ("awq", "bits", 3, "search_bits"),
           ("gptq", "asymmetric", 0.125, "float_target_strength"), ("kmeans", "group_size", 8, "channels_per_table")]


@pytest.mark.parametrize("pass_type, old, value, new", RENAMED)
def test_old_option_names_still_read_with_a_deprecation_line(write_recipe, pass_type, old, value, new):
    """One meaning per option name: the renamed options read as their new names, and the recipe says so."""
    from compress.recipe import deprecations

    after = "  - type: gptq\n" if pass_type == "awq" else ""
    path = write_recipe(f"passes:\n  - type: {pass_type}\n    {old}: {value}\n{after}")
    recipe = load_recipe(path)
    assert getattr(recipe.passes[0], new) == value
    assert recipe.passes[0] == load_recipe(write_recipe(f"passes:\n  - type: {pass_type}\n    {new}: {value}\n{after}",
                                                        "new.yaml")).passes[0]
    assert deprecations(recipe) == [f"{path}:3: passes.0.{old} is now '{new}' (the old name still works)"]
    result = cli("validate", path)
    assert result.exit_code == 0 and f"passes.0.{old} is now '{new}'" in result.stderr


def test_old_and_new_option_name_together_is_refused(write_recipe):
    path = write_recipe("passes:\n  - type: gptq\n    asymmetric: 0.25\n    float_target_strength: 0.1\n")
    result = cli("validate", path)
    assert result.exit_code == 2 and "'asymmetric' is the old name of 'float_target_strength'" in result.stderr
