"""Every config value that can be wrong is refused before any MLflow run opens and before anything
trains, with its key, what is allowed and the value given: one table of (overrides, words the
message must hold), each row a real ``run()`` on a fresh output folder."""

from pathlib import Path

import pytest

from kd.run.experiment import run

# (overrides, words in the message): the key, what it allows, and the value given
BAD = [
    # seeds and counts (kd/run/config.py: check_counts)
    (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
    (["seed=1.5"], "seed must be an integer >= 0, got 1.5"),
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["teacher.seed=x"], "teacher.seed must be an integer >= 0, got 'x'"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1, got 0"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs must be an integer >= 1, got -1"),
    (["teacher.max_epochs=0"], "teacher.max_epochs must be an integer >= 1, got 0"),
    # switches: a string is truthy in Python and would switch the feature on
    (["compile=maybe"], "compile must be true or false, got 'maybe'"),
    (["distill_cache=maybe"], "distill_cache must be true or false, got 'maybe'"),
    (["resume=maybe"], "resume must be true or false, got 'maybe'"),
    (["log_steps=3"], "log_steps must be true or false, got 3"),
    (["log_steps=true", "trainer.log_every_n_steps=0"], "trainer.log_every_n_steps steps, which must be an integer >= 1, got 0"),
    (["measure.latency=yes"], "measure.latency must be one of true, false, quick, full, got 'yes'"),
    (["measure.threads=0"], "measure.threads must be an integer >= 1, got 0"),
    (["data.augment=1"], "data.augment must be true or false, got 1"),
    (["teacher.augment=sometimes"], "teacher.augment must be true, false or null, got 'sometimes'"),
    (["measure.large_batch=0"], "measure.large_batch must be an integer >= 1, got 0"),
    # data
    (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    (["data.batch_size=abc"], "data.batch_size must be an integer >= 1, got 'abc'"),
    (["data.batch_size=1.5"], "data.batch_size must be an integer >= 1, got 1.5"),
    (["data.eval_batch_size=0"], "data.eval_batch_size must be an integer >= 1, got 0"),
    (["data.val_fraction=1.2"], "data.val_fraction must lie in (0, 1), got 1.2"),
    (["data.val_fraction=0"], "data.val_fraction must lie in (0, 1), got 0"),
    (["data.test_fraction=-0.1"], "data.test_fraction must lie in (0, 1), got -0.1"),
    (["data.limit_train=0"], "data.limit_train must be an integer >= 1 or null, got 0"),
    (["data.augment_padding=-1"], "data.augment_padding must be an integer >= 0, got -1"),
    (["data.split_seed=x"], "data.split_seed must be an integer >= 0, got 'x'"),
    (["student.omit_classes=[11]"], "student.omit_classes must be some of the classes 0..9, got [11]"),
    # optimisers and schedules, the teacher's too (torch's own checks, named with the key)
    (["student.optimizer.lr=-0.1"], "student.optimizer (torch.optim.SGD) refuses its arguments: Invalid learning rate: -0.1"),
    (["student.optimizer.lr=abc"], "student.optimizer (torch.optim.SGD) refuses its arguments"),
    (["student.optimizer.momentum=2"], "student.optimizer.momentum must be a number in [0, 1), got 2"),
    (["student.optimizer.weight_decay=-1"], "student.optimizer (torch.optim.SGD) refuses its arguments: Invalid weight_decay value: -1"),
    (["teacher.optimizer.lr=-1"], "teacher.optimizer (torch.optim.SGD) refuses its arguments: Invalid learning rate: -1"),
    (["student.scheduler.T_max=abc"], "student.scheduler (torch.optim.lr_scheduler.CosineAnnealingLR) refuses its arguments"),
    (["teacher.scheduler.T_max=0"], "teacher.scheduler (torch.optim.lr_scheduler.CosineAnnealingLR) refuses its arguments"),
    # keys a class does not take: the trainer's before Lightning, the model's at instantiation
    (["+trainer.max_epoch=3"], "has no argument(s) ['max_epoch']"),
    (["+student.model.hiden=[3]"], "hiden"),
    # the trainer, as Lightning reads it on this machine
    (["trainer.precision=17"], "Lightning refuses the trainer settings (trainer.accelerator=cpu, trainer.devices=1, trainer.precision=17): Precision 17 is invalid"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.accelerator=tpu"], "trainer.accelerator=tpu"),
    # weights files
    (["student.init_checkpoint=/nonexistent/student.pt"], "student.init_checkpoint: checkpoint not found: /nonexistent/student.pt"),
    (["teacher=checkpoint", "teacher.checkpoint=/nonexistent/teacher.pt"], "teacher.checkpoint: checkpoint not found: /nonexistent/teacher.pt"),
    # the objective (the zoo's own table: tests/losses/test_zoo_runs.py)
    (["distill.alpha=1.5"], "distill.alpha must lie in [0, 1], got 1.5"),
    (["distill.temperature=0"], "distill.temperature must be a finite number > 0, got 0"),
    (["distill.temperature=abc"], "distill.temperature must be a finite number > 0, got 'abc'"),
    # pruning
    (["prune=magnitude", "prune.sparsity=1.5"], "prune.sparsity must be a fraction in [0, 1), got 1.5"),
    (["prune=magnitude", "prune.scope=everywhere"], "prune.scope must be one of ('layer', 'global'), got 'everywhere'"),
    (["prune=magnitude", "prune.unit=hour"], "prune.unit must be one of ('epoch', 'step'), got 'hour'"),
    (["prune=magnitude", "prune.start=1.5"], "prune.start must be an integer >= 0, got 1.5"),
    (["prune=magnitude", "prune.start=99"], "the pruning schedule ends at epoch 99 but training has trainer.max_epochs=2"),
    (["prune=magnitude", "prune.layers=[nope*]"], "no prunable layer matches 'nope*'; the prunable layers are ['layers.0', 'head']"),
    (["prune=agp", "prune.start=2", "prune.end=1"], "a agp schedule needs prune.end >= prune.start (got start=2, end=1)"),
    (["prune=structured", "prune.sparsity=1.0"], "prune.sparsity must be a fraction in [0, 1), got 1.0"),
    # quantisation
    (["export=tflite"], "export must be one of ('none', 'onnx'), got 'tflite'"),
    (["quantize=ptq", "quantize.observer=nope"], "quantize.observer must be one of ('minmax', 'moving_average', 'histogram', 'percentile', 'entropy'), got 'nope'"),
    (["quantize=ptq", "quantize.backend=arm"], "quantize.backend must be one of ('auto', 'x86', 'fbgemm', 'qnnpack', 'xnnpack'), got 'arm'"),
    (["quantize=ptq", "quantize.calibration_batches=0"], "quantize.calibration_batches must be >= 1, got 0"),
    (["quantize=qat", "quantize.bits=1"], "quantize.bits must lie in [2, 8], got 1"),
    (["quantize=cluster", "quantize.bits=0"], "quantize.bits must lie in [1, 8] for clustering, got 0"),
    (["quantize=qat", "quantize.budget_bits=1.5"], "quantize.budget_bits must lie in [2, 8] (average bits per weight), got 1.5"),
    (["quantize=qat", "quantize.budget_bits=8.5"], "quantize.budget_bits must lie in [2, 8] (average bits per weight), got 8.5"),
    (["quantize=qat", "quantize.budget_bits=four"], "quantize.budget_bits must lie in [2, 8] (average bits per weight), got 'four'"),
    (["quantize=qat", "quantize.budget_bits=3", "quantize.bit_choices=[4,8]"], "quantize.budget_bits=3 is below the narrowest of quantize.bit_choices [4, 8]"),
    (["quantize=qat", "quantize.budget_bits=4", "quantize.bit_choices=[1,4]"], "quantize.bit_choices must be distinct widths in 2..8, got [1, 4]"),
    (["quantize=qat", "quantize.budget_bits=4", "quantize.bits=4"], "quantize.bits=4 is one width for every layer; with quantize.budget_bits"),
    (["quantize=qat", "quantize.budget_bits=4", "quantize.sensitivity=guess"], "quantize.sensitivity must be one of ('measured', 'hessian'), got 'guess'"),
    (["quantize=qat", "quantize.budget_bits=4", "prune=magnitude"], "quantize.budget_bits with prune=magnitude is not supported"),
    # early exits (student=multi_exit)
    (["student=multi_exit", "student.exits.stages=[hidden1,nope]"], "unknown student layer name(s) ['nope'] in MLP; valid names"),
    (["student=multi_exit", "model@student.model=mlp", "student.exits.stages=[hidden2,hidden1]"],
     "student.exits.stages must run shallow to deep, in the order the forward reaches them: ['hidden1', 'hidden2']"),
    (["student=multi_exit", "student.exits.loss_weights=[1.0]"], "student.exits.loss_weights needs 2 non-negative weights (one per exit, hidden1, final)"),
    (["student=multi_exit", "student.exits.distill_from=self"], "student.exits.distill_from must be one of ('teacher', 'final'), got 'self'"),
    (["student=multi_exit", "student.exits.criterion=margin"], "student.exits.criterion must be one of ('max_softmax', 'entropy'), got 'margin'"),
    (["student=multi_exit", "student.exits.max_drop=5"], "student.exits.max_drop must be an accuracy drop in [0, 1], got 5"),
    (["student=multi_exit", "student.exits.thresholds=1"], "student.exits.thresholds must be an integer >= 2"),
    (["student=multi_exit", "distill=none", "student.exits.distill_from=final"], "student.exits.distill_from=final distils the early exits"),
    (["student=multi_exit", "distill=at"], "an objective with feature terms is not supported with early exits"),
    (["student=multi_exit", "prune=magnitude"], "student=multi_exit with prune="),
    # slimmable students (student=slimmable)
    (["student=slimmable", "student.widths=[0.5,1.5]"], "student.widths must lie in (0, 1], got [0.5, 1.5]"),
    (["student=slimmable", "student.widths=[1.0,0.5]"], "student.widths must be distinct and increasing, got [1.0, 0.5]"),
    (["student=slimmable", "student.widths=[0.01,1.0]"], "student.widths [0.01] leave layers.0 with no channels"),
    (["student=slimmable", "student.random_widths=-1"], "student.random_widths must be an integer >= 0, got -1"),
    (["student=slimmable", "distill=at"], "an objective with feature terms is not supported with slimmable students"),
    (["student=slimmable", "quantize=ptq"], "student=slimmable with quantize="),
    # low-rank factorisation
    (["factorize=svd", "factorize.energy=1.5"], "factorize.energy must be a fraction in (0, 1], got 1.5"),
    (["factorize=svd", "factorize.conv=diag"], "factorize.conv must be one of ('channel', 'spatial', 'none'), got 'diag'"),
    (["factorize=svd", "factorize.at=middle"], "factorize.at must be one of ('end', 'start'), got 'middle'"),
    (["factorize=svd", "factorize.finetune_epochs=-1"], "factorize.finetune_epochs must be an integer >= 0, got -1"),
    (["factorize=svd", "factorize.rank=0", "factorize.energy=null"], "factorize.rank must be an integer >= 1, got 0"),
    (["factorize=svd", "factorize.rank=4", "factorize.energy=0.5"], "exactly one of factorize.rank and factorize.energy must be set"),
    # the tracking store
    (["tracking.uri=ftp://example.org/store"], "tracking.uri 'ftp://example.org/store' is not a store MLflow can use"),
]  # fmt: skip


def _message(err: BaseException) -> str:
    """The error's text with its causes' (Hydra wraps a constructor's ValueError, keeping it as the cause)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__
    return "\n".join(parts)


@pytest.mark.parametrize(("overrides", "words"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_value_is_refused_with_its_key_before_anything_opens_or_trains(make_cfg, overrides, words):
    cfg = make_cfg(*overrides)
    with pytest.raises(Exception) as err:
        run(cfg)
    assert words in _message(err.value), _message(err.value)
    root = Path(cfg.paths.output_root)
    assert not (root / "mlflow.db").exists() and not (root / "teachers").exists()  # no store, no run, no teacher
    assert not Path(cfg.paths.run_dir).exists() or not any(Path(cfg.paths.run_dir).iterdir())  # nothing half-written


def test_the_table_reaches_every_group_a_user_can_set():
    """A new config group gets its rows here: the table names a value of each."""
    conf = Path(__file__).resolve().parents[2] / "conf"
    groups = {p.name for p in conf.iterdir() if p.is_dir()} - {"hydra", "experiment", "hparams_search", "callbacks", "model"}
    named = {o.split("=")[0].lstrip("+").split(".")[0] for row in BAD for o in row[0]}
    assert groups <= named | {"student", "teacher"}, groups - named
