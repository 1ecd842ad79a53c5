import subprocess
import sys

import pytest

from pipelines.config.errors import ConfigError
from pipelines.config.loader import flatten, load_config
from pipelines.config.presets import PRESETS


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    spec = PRESETS[preset]
    assert cfg.preset == preset and cfg.data.name == spec["data"]["name"]
    assert cfg.tracking.experiment == f"metadistill-{spec['data']['name']}"  # named after the data
    assert cfg.teacher.model.arch == spec["teacher"]["model"]["arch"]  # the preset's own settings, not defaults
    assert cfg.teacher.train.steps == spec["teacher"]["train"]["steps"]
    assert cfg.student.model.arch == spec["student"]["model"]["arch"]


def test_default_is_digits_with_scratch_and_kd():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.student.methods == ["scratch", "kd", "maml_init", "meta_distill"]
    assert len(cfg.student.seeds) >= 3


def test_an_image_folder_gets_the_imagefolder_preset_with_a_conv_student(tmp_path):
    """Issue 36, situation 4: a 32x32 RGB folder got the digits preset's MLP student."""
    cfg = load_config(overrides=["data.name=imagefolder", "data.root=/x"])
    assert cfg.preset == "imagefolder" and cfg.data.name == "imagefolder"
    assert cfg.student.model.arch == "resnet8" and cfg.student.model.kwargs == {"base_width": 8}
    assert cfg.teacher.model.arch == "resnet8" and [a.name for a in cfg.data.augment] == ["random_crop", "horizontal_flip"]
    assert not cfg.student.train.augment
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nname = "imagefolder"\nroot = "/x"\n')
    assert load_config(config_file=toml).preset == "imagefolder"
    assert load_config(overrides=["data={name: imagefolder, root: /x}"]).preset == "imagefolder"
    # A named preset wins; other data sets keep the default preset.
    assert load_config("digits", overrides=["data.name=imagefolder"]).student.model.arch == "mlp"
    assert load_config(overrides=["data.name=mnist"]).preset == "digits"


def test_overrides_are_typed():
    cfg = load_config(overrides=["student.train.steps=7", "kd.temperature=2.5", "student.seeds=[4, 5]",
                                 "data.label_budget=500", "tracking.register_best=false"])
    assert cfg.student.train.steps == 7 and cfg.kd.temperature == 2.5 and cfg.student.seeds == [4, 5]
    assert cfg.data.label_budget == 500 and cfg.tracking.register_best is False


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'kd.temp'.*alpha, grid_alpha, .*soft_loss, temperature, "
                                          r"transfer_ratio"):
        load_config(overrides=["kd.temp=3"])
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(overrides=["nope=1"])


def test_wrong_type_and_range():
    with pytest.raises(ConfigError, match=r"student.train.steps.*integer"):
        load_config(overrides=["student.train.steps=many"])
    with pytest.raises(ConfigError, match=r"kd.alpha.*less than or equal to 1"):
        load_config(overrides=["kd.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"data.name.*'digits'"):
        load_config(overrides=["data.name=svhn"])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="quiz_fraction \\+ data.val_fraction"):
        load_config(overrides=["data.quiz_fraction=0.6", "data.val_fraction=0.4"])
    big = ["student.model.arch=resnet20", "student.model.kwargs={}"]
    with pytest.raises(ConfigError, match="more than teacher.model's"):
        load_config(overrides=big)
    assert load_config(overrides=big + ["student.must_be_smaller=false"])
    with pytest.raises(ConfigError, match="student.model .* cannot be built.*'hidden'"):
        load_config(overrides=["student.model.arch=resnet8", "student.model.kwargs={hidden: [8]}"])
    # Another architecture by --set drops the old one's arguments (the mlp's hidden sizes).
    assert load_config(overrides=["student.model.arch=resnet8"]).student.model.kwargs == {}
    with pytest.raises(ConfigError, match="unknown student method"):
        load_config(overrides=["student.methods=[scratch, telepathy]"])
    with pytest.raises(ConfigError, match="unknown model 'resnet9'"):
        load_config(overrides=["teacher.model.arch=resnet9"])
    with pytest.raises(ConfigError, match="label_budget=10 is smaller"):
        load_config(overrides=["data.label_budget=10"])


def test_config_files(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "mnist"\n[student.train]\nsteps = 11\n')
    cfg = load_config(config_file=toml)
    assert cfg.preset == "mnist" and cfg.student.train.steps == 11 and cfg.data.label_budget == 1000
    yml = tmp_path / "c.yaml"
    yml.write_text("kd:\n  alpha: 0.5\n")
    assert load_config(config_file=yml, overrides=["kd.alpha=0.25"]).kd.alpha == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("kd: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(config_file=bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(config_file=tmp_path / "missing.toml")


def test_flatten_for_mlflow_params():
    flat = flatten(load_config())
    assert flat["kd.temperature"] == "4.0" and flat["student.model.kwargs"] == '{"hidden": [16]}'


def test_cli_rejects_bad_config_with_exit_2_before_any_work(home):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--set", "kd.temp=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'kd.temp'" in proc.stderr and "temperature" in proc.stderr
    assert not (home / "mlflow.db").exists() and not (home / "prefect").exists()


def test_transfer_settings_default_on():
    cfg = load_config("mnist")
    assert cfg.data.transfer and cfg.kd.transfer_ratio > 0 and cfg.data.label_budget == 1000
    assert cfg.kd.transfer_batch(64) == round(64 * cfg.kd.transfer_ratio)


@pytest.mark.parametrize("override,message", [
    (["student.train.batch_size=900"], "student.train.batch_size=900 exceeds the train split of digits"),
    (["dist.nproc=3"], "teacher.train.batch_size=64 does not split evenly over 3"),
    (["dist.nnodes=2"], "needs dist.rdzv_endpoint=HOST:PORT"),
    (["dist.backend=nccl", "dist.device=cpu"], "dist.backend=nccl needs CUDA tensors"),
    (["student.concurrency=2", "dist.nproc=2"], "student.concurrency=2 trains students side by side"),
    (["student.concurrency=2", "student.model.kwargs={hidden: [16], dropout: 0.1}"], "students without dropout"),
    (["maml.ways=11"], "maml.ways=11 exceeds the 10 classes of digits"),
    (["student.methods=[scratch, scratch]"], "lists a method twice"),
    (["student.seeds=[]"], "student.seeds must be a non-empty list"),
    (["teacher.uri=models:/t/1"], "teacher.uri is set but teacher source is 'train'"),
    (["teacher.source=registry"], "teacher source 'registry' needs teacher.uri"),
    (["teacher.source=registry", "teacher.uri=t@1"], "is not a registry URI"),
    (["teacher.image_size=64"], "teacher.image_size applies to torchvision/timm teachers"),
    (["teacher.finetune.mode=head"], "teacher.finetune applies to a teacher you bring"),
    (["student.init=file"], "student.init source 'file' needs student.init_uri"),
    (["fewshot.eval_shots=[1, 10]", "fewshot.eval_queries=15"], "exceeds Omniglot's 20 drawings"),
    (["data.augment_search.ops=[rotate, rotate]"], "must be distinct ops"),
    (["data.augment_policy_file=/nowhere.json"], "set data.augment_policy=learned"),
    (["data.augment_policy=learned", "data.augment_policy_file=/nowhere.json"], "does not exist"),
    (["data.augment_policy=learned", "data.augment_search.proxy=teacher", "teacher.source=torchvision",
      "teacher.model.arch=resnet18", "teacher.weights=DEFAULT", "data.image_size=32", "student.must_be_smaller=false"],
     "proxy=teacher trains teacher.model from scratch"),
    (["student.methods=[maml_init]", "student.init=torchvision", "student.model.arch=resnet18",
      "student.init_uri=x.pth", "data.name=cifar10", "student.must_be_smaller=false"], "BatchNorm running statistics"),
    (["tracking.promotion_alpha=0"], "tracking.promotion_alpha"),
    (["kd.temprature=2"], "did you mean 'kd.temperature'"),
    (["meta_distill_pilot.order=first", "meta_distill_pilot.learn=[kd_params]"],
     "order=first .*learn=\\[teacher\\]"),
    (["meta_distill_pilot.learn=[]"], "meta_distill_pilot.learn must list distinct items"),
    (["meta_distill_pilot.learn=[kd_params, kd_params]"], "meta_distill_pilot.learn must list distinct items"),
    (["meta_distill_pilot.learn=[temperature]"], "meta_distill_pilot.learn.0"),
    (["meta_distill_pilot.learn=[head]"], "meta_distill_pilot.learn.0"),
    (["meta_distill_pilot.start_step=100", "meta_distill_pilot.stop_step=50"], "stop_step=50 must exceed"),
    (["meta_distill.temperature.box=[4, 2]"], "must be 0 < low <= high"),
    (["meta_distill.temperature.learn=true", "student.train.optimizer.name=adam"], "follows SGD steps"),
    (["meta_distill.head_lrr=1"], "did you mean 'meta_distill.head'"),
    (["meta_distill.learn=[kd_params]", "student.methods=[meta_distill+maml_init]"], "no \\+maml_init variant"),
    (["kd.grid_alpha=[0.5, 1.5]"], "kd.grid_alpha has out-of-range values \\[1.5\\]"),
    (["kd.grid_temperature=[]"], "kd.grid_temperature must list at least one value"),
    (["dist.nproc=2", "kd.transfer_ratio=0.5", "student.train.batch_size=66", "teacher.train.batch_size=66",
      "meta_distill.quiz_batch_size=66", "maml.meta_batch=8"], "transfer batch .* does not split evenly over 2"),
])
def test_every_cross_check_names_its_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override)


def test_moved_meta_distill_keys_work_for_a_release_and_name_their_new_place(tmp_path):
    """The flat keys of meta_distill before its sub-sections, as --set items and in a file:
    each warns naming its new key and lands there; an old learn list other than [head]
    runs the pilot update as its own method, with the settings it shared."""
    old = ["meta_distill.head_lr=0.5", "meta_distill.guard_every=7", "meta_distill.learn_temperature=true",
           "meta_distill.temperature=3", "meta_distill.feedback=1", "meta_distill.horizon_window=4"]
    with pytest.warns(FutureWarning, match="meta_distill.head_lr is now meta_distill.head.lr"):
        cfg = load_config(overrides=old)
    md = cfg.meta_distill
    assert (md.head.lr, md.guard.every, md.temperature.learn, md.temperature.value, md.feedback.weight,
            md.temperature.window) == (0.5, 7, True, 3.0, 1.0, 4)
    path = tmp_path / "old.yaml"
    path.write_text("meta_distill:\n  head_lr: 0.5\n  guard_every: 7\n  learn_temperature: true\n  temperature: 3\n"
                    "  feedback: 1\n  horizon_window: 4\n")
    with pytest.warns(FutureWarning, match="meta_distill.guard_every is now meta_distill.guard.every"):
        assert load_config(config_file=path).meta_distill == md
    with pytest.warns(FutureWarning, match="is now the method meta_distill_pilot"):
        pilot = load_config(overrides=["meta_distill.learn=[kd_params]", "meta_distill.knob_lr=0.1",
                                       "meta_distill.interval=5", "meta_distill.temperature=3"])
    assert pilot.student.methods == ["scratch", "kd", "maml_init", "meta_distill_pilot"]
    mp = pilot.meta_distill_pilot
    assert (mp.learn, mp.knob_lr, mp.interval, mp.temperature) == (["kd_params"], 0.1, 5, 3.0)
    with pytest.warns(FutureWarning, match="meta_distill.learn is gone"):
        assert load_config(overrides=["meta_distill.learn=[head]"]).meta_distill == load_config().meta_distill


def _run_cli(home, *sets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(METADISTILL_HOME=str(home), METADISTILL_DATA="")
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *[x for s in sets for x in ("--set", s)]],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("sets,message", [
    (["data.name=mnist", "data.root=/nowhere/at/all"], "data root /nowhere/at/all is not a folder"),
    (["data.name=mnist"], "data set 'mnist' needs a data folder"),
    (["data.label_budget=100", "student.train.batch_size=90"], "student.train.batch_size=90 exceeds the 80 training"),
    (["data.transfer_root=/nowhere/images"], "data.transfer_root /nowhere/images is not a folder"),
])
def test_bad_inputs_exit_2_with_one_line_and_leave_nothing_tracked(home, sets, message):
    proc = _run_cli(home, *sets)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("metadistill: ") and message in lines[0], proc.stderr[-2000:]
    assert not (home / "mlflow.db").exists() and not (home / "prefect").exists()
    # `metadistill config` refuses the same inputs
    config = subprocess.run([sys.executable, "-m", "pipelines.cli", "config", *[x for s in sets for x in ("--set", s)]],
                            capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "METADISTILL_HOME": str(home), "METADISTILL_DATA": ""})
    assert config.returncode == 2 and message in config.stderr


def test_experiment_names_follow_the_data_unless_set():
    assert load_config().tracking.experiment == "metadistill-digits"
    assert load_config("mnist", overrides=["data.name=fashion-mnist"]).tracking.experiment == "metadistill-fashion-mnist"
    folder = ["data.name=imagefolder", "data.root=/x/My Pets!"]
    assert load_config(overrides=folder).tracking.experiment == "metadistill-imagefolder-My-Pets"
    assert load_config(overrides=[*folder, "tracking.experiment=mine"]).tracking.experiment == "mine"
    assert load_config(overrides=["data.name=imagefolder"]).tracking.experiment == "metadistill-imagefolder"


def test_maml_meta_steps_follow_the_students_budget_unless_set():
    assert load_config().maml.meta_steps == 300  # digits: 1500 student steps
    assert load_config(overrides=["student.train.steps=100"]).maml.meta_steps == 20
    assert load_config(overrides=["student.train.steps=100", "maml.meta_steps=7"]).maml.meta_steps == 7
    with pytest.raises(ConfigError, match="fewshot.meta.meta_steps must be set"):
        load_config(overrides=["fewshot.meta.meta_steps=null"])


def test_long_meta_training_is_announced_with_where_to_bound_it(capsys):
    from pipelines.config.students import MamlConfig
    from pipelines.engine.meta_loop import _announce

    _announce("student maml_init seed 0", MamlConfig(meta_steps=300), per_step=1.5, left=298)
    out = capsys.readouterr().out
    assert "takes about 447 s more (298 meta-steps of 1.50 s" in out and "maml.meta_steps" in out
    _announce("x", MamlConfig(meta_steps=300, time_budget_s=20), per_step=1.5, left=298)  # bounded: unannounced
    _announce("x", MamlConfig(meta_steps=10), per_step=0.1, left=8)
    assert capsys.readouterr().out == ""


def _image_folder(root, classes: int, per_class: int = 6):
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_an_image_folders_class_count_is_read_from_its_folders(tmp_path):
    from pipelines.orchestrate.preflight import check_inputs
    from pipelines.teacher import sources

    folder = ["data.name=imagefolder", f"data.root={_image_folder(tmp_path / 'pets', 4)}", "data.label_budget=null",
              "student.train.batch_size=4", "teacher.train.batch_size=4"]
    cfg = load_config(overrides=[*folder, "maml.ways=5"])  # the count is unknown until the folder is listed
    with pytest.raises(ConfigError, match="maml.ways=5 exceeds the 4 classes of the image folder"):
        check_inputs(cfg, sources=False)
    big = load_config(overrides=[*folder, "student.model.arch=mlp", "student.model.kwargs={hidden: [512]}",
                                 "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [8]}"])
    with pytest.raises(ConfigError, match="for the 4 classes of the image folder"):
        check_inputs(big, sources=False)
    assert sources.preflight(load_config(overrides=folder)) == []  # lists the folder itself for its count


def test_small_validation_splits_are_warned_before_work():
    from pipelines.orchestrate.preflight import check_inputs

    notes = check_inputs(load_config(overrides=["data.label_budget=200"]), sources=False)
    assert len(notes) == 1 and "the validation split holds 20 images (quiz 20, validation 20, test 359)" in notes[0]
    assert "5.0 points" in notes[0] and "data.label_budget" in notes[0]
    assert check_inputs(load_config(), sources=False) == []  # digits' 144 validation images


def test_a_budget_needs_the_cost_card_it_is_checked_on():
    with pytest.raises(ConfigError, match="student.budget \\(params\\) is checked at promotion on the student's cost card"):
        load_config(overrides=["student.budget.params=5000", "tracking.cost_card=false"])
    assert not load_config(overrides=["tracking.cost_card=false"]).tracking.cost_card
