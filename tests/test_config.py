from dataclasses import dataclass
from pathlib import Path

import pytest

from ilora_cli.config import check_minimums, parse_overrides, resolve
from ilora_cli.errors import UserError


@dataclass
class Cfg:
    name: str = "a"
    lr: float = 1e-3
    epochs: int = 3
    flag: bool = False
    path: Path | None = None
    ks: list[int] | None = None


def test_layers_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nepochs: 7\nname: yaml\n")
    cfg = resolve(Cfg, f, {"epochs": 9, "name": None}, ["name=cli", "flag=true", "ks=[1, 3]"])
    assert (cfg.lr, cfg.epochs, cfg.name, cfg.flag, cfg.ks) == (0.5, 9, "cli", True, [1, 3])


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(UserError, match="Unknown key lrr .*valid keys are: epochs, flag, ks, lr, name, path"):
        resolve(Cfg, None, {}, ["lrr=1"])
    f = tmp_path / "c.yaml"
    f.write_text("bogus: 1\n")
    with pytest.raises(UserError, match="in the config file"):
        resolve(Cfg, f)


@pytest.mark.parametrize(
    "pair, msg", [("epochs=abc", "integer"), ("flag=maybe", "true or false"), ("noequals", "key=value")]
)
def test_bad_values(pair, msg):
    with pytest.raises(UserError, match=msg):
        resolve(Cfg, None, {}, [pair])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve(Cfg, tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve(Cfg, f)


def test_parse_overrides_types():
    assert parse_overrides(["a=1", "c=x y", "d="]) == {"a": 1, "c": "x y", "d": ""}
    # YAML reads "1e-3" as text; the field's type turns it into a number
    assert resolve(Cfg, None, {}, ["lr=1e-3"]).lr == 1e-3


@pytest.mark.parametrize(
    "changes,msg",
    [
        ({"batch_size": 0}, "batch_size must be at least 1; got 0."),
        ({"candidates": 1}, "candidates must be at least 2; got 1."),
        ({"max_steps": 0}, "max_steps must be at least 1; got 0."),
        ({"stop_after": -3}, "stop_after must be at least 1; got -3."),
    ],
)
def test_train_config_minimums(changes, msg):
    from ilora_cli.training.loop import TrainConfig

    with pytest.raises(UserError) as e:
        TrainConfig(dataset="x", **changes).validate()
    assert str(e.value) == msg


def test_check_minimums_lets_unset_optionals_pass():
    @dataclass
    class C:
        a: int = 1
        b: int | None = None

    check_minimums(C(), {"a": 1, "b": 5})
    with pytest.raises(UserError, match="b must be at least 5; got 4"):
        check_minimums(C(b=4), {"a": 1, "b": 5})


def test_a_single_value_is_a_list_of_one():
    """``validate_at=96`` on the command line: a list setting given one number holds that number."""
    from ilora_cli.config import resolve
    from ilora_cli.training.loop import TrainConfig

    assert resolve(TrainConfig, overrides=["validate_at=96"]).validate_at == [96]
    assert resolve(TrainConfig, overrides=["validate_at=8,16"]).validate_at == [8, 16]
    with pytest.raises(UserError, match="validate_at must be a list"):
        resolve(TrainConfig, overrides=["validate_at=true"])


def test_validation_steps_beyond_the_run_are_refused():
    """Before: `validate_at=50,100` with `max_steps=2` never validated and said nothing."""
    from ilora_cli.training.loop import TrainConfig

    with pytest.raises(UserError, match=r"validate_at lists steps 50, 100 beyond the run's 2 optimisation steps"):
        resolve(TrainConfig, overrides=["validate_at=50,100", "max_steps=2"])
    with pytest.raises(UserError, match=r"step 3 beyond the run's 2"):
        resolve(TrainConfig, overrides=["validate_at=2,3", "max_steps=2"])
    assert resolve(TrainConfig, overrides=["validate_at=1,2", "max_steps=2"]).validate_at == [1, 2]
