import pytest
import yaml
from click.testing import CliRunner

from phi3_export.cli import main
from phi3_export.errors import Phi3ExportError
from phi3_export.recipes import list_recipes, load_recipe, recipes_dir

EXPECTED = {
    "phi-3-mini-4k", "phi-3-mini-128k", "phi-3-small-8k", "phi-3-small-128k", "phi-3-medium-4k", "phi-3-medium-128k",
    "phi-3-vision-128k", "phi-3.5-mini", "phi-3.5-moe", "phi-3.5-vision", "phi-4-mini",
}


def test_all_eleven_recipes_load_and_are_listed():
    assert set(list_recipes()) == EXPECTED
    result = CliRunner().invoke(main, ["recipes", "list"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.output.splitlines()}
    assert set(rows) == EXPECTED
    # Support status up front, so nobody downloads 7-84 GB of weights to find out.
    assert rows["phi-3-mini-4k"].endswith("supported") and rows["phi-3.5-moe"].endswith("supported")
    assert all(rows[name].endswith(" supported") for name in EXPECTED)
    for name in EXPECTED:
        recipe = load_recipe(name)
        assert recipe.name == name


def test_published_facts():
    mini = load_recipe("phi-3-mini-4k").model
    assert (mini.num_heads, mini.num_kv_heads, mini.head_dim, mini.sliding_window) == (32, 32, 96, 2047)
    medium = load_recipe("phi-3-medium-4k").model
    assert (medium.num_heads, medium.num_kv_heads) == (40, 10)
    phi4 = load_recipe("phi-4-mini").model
    assert phi4.rope.partial_rotary_factor == 0.75 and phi4.tie_word_embeddings is True and phi4.tokenizer == "byte-bpe"
    assert load_recipe("phi-3-medium-128k").model.sliding_window == "from-checkpoint"
    small = load_recipe("phi-3-small-8k").model
    assert small.tie_word_embeddings is True and small.blocksparse.vert_stride == 8


def test_long_context_recipes_cap_max_length():
    for name in EXPECTED:
        recipe = load_recipe(name)
        if recipe.model.context_length == 131072:
            assert recipe.export.max_length <= 8192
            for options in recipe.export.target_options.values():
                assert options.max_length is None or options.max_length <= 8192


def test_recipe_show_and_path(tmp_path):
    result = CliRunner().invoke(main, ["recipes", "show", "phi-3.5-mini"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["model"]["rope"]["kind"] == "longrope"
    path = tmp_path / "mine.yaml"
    path.write_text((recipes_dir() / "phi-3-mini-4k.yaml").read_text().replace("name: phi-3-mini-4k", "name: mine"))
    assert load_recipe(str(path)).name == "mine"


def _broken(tmp_path, old, new):
    text = (recipes_dir() / "phi-3-mini-4k.yaml").read_text()
    assert old in text
    path = tmp_path / "broken.yaml"
    path.write_text(text.replace(old, new))
    line = text.splitlines().index(next(line for line in text.splitlines() if old in line)) + 1
    return path, line


def test_typo_names_file_line_and_field(tmp_path):
    path, line = _broken(tmp_path, "num_kv_heads: 32", "num_kv_hedas: 32")
    with pytest.raises(Phi3ExportError) as err:
        load_recipe(str(path))
    assert str(err.value).startswith(f"{path}:{line}: model.num_kv_hedas: unknown field")
    assert "\n" not in str(err.value)


def test_bad_value_names_line(tmp_path):
    path, line = _broken(tmp_path, "block_size: 32", "block_size: 48")
    with pytest.raises(Phi3ExportError, match=rf"{path}:{line}: quantization.block_size: .*power of two"):
        load_recipe(str(path))


def test_invalid_yaml_and_unknown_recipe(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(Phi3ExportError, match="x.yaml:.*invalid YAML"):
        load_recipe(str(path))
    with pytest.raises(Phi3ExportError, match="unknown recipe 'phi-9'"):
        load_recipe("phi-9")


def test_su_is_longrope_and_heads_must_divide(tmp_path):
    path, _ = _broken(tmp_path, "kind: default", "kind: su")
    assert load_recipe(str(path)).model.rope.kind == "longrope"
    path, _ = _broken(tmp_path, "num_kv_heads: 32", "num_kv_heads: 5")
    with pytest.raises(Phi3ExportError, match="not a multiple of num_kv_heads 5"):
        load_recipe(str(path))
