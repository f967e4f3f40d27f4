"""Hostile inputs to the MTL lens (per-task gradients, conflict metrics, the trainer, the
ready-made workloads; the aggregators have their own catalog). Each case asserts the exact
outcome: a WorkbenchError whose message names the culprit and what is accepted, or the right
value. The trainer's checkpoint survives an exception or Ctrl-C at every I/O step (the old
state or the new one on disk, never a mix, no user file lost) and a run resumed from it is
bit-identical to one never interrupted."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from workbench import WorkbenchError
from workbench import storage
from workbench.mtl import gradients as G
from workbench.mtl import trainer as TR
from workbench.mtl import workloads as WL
from workbench.mtl.trainer import MultiTaskTrainer, TrainingHistory, TrainingStopped
from workbench.results import Result


class Net(nn.Module):
    """A shared trunk of two linear layers and one scalar head per task."""

    def __init__(self, seed: int = 0, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6, bias=bias))
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 1), "b": nn.Linear(6, 1)})

    def forward(self, batch):
        h = self.trunk(batch["x"])
        return {k: m(h).squeeze(-1) for k, m in self.heads.items()}


def data(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"x": torch.randn(8, 4, generator=g), "ya": torch.randn(8, generator=g), "yb": torch.randn(8, generator=g)}


LOSSES = {"a": lambda o, b: ((o - b["ya"]) ** 2).mean(), "b": lambda o, b: ((o - b["yb"]) ** 2).mean()}


def two(net: Net | None = None):
    """Two task losses of ``net`` on batch 0, and the net."""
    net = net or Net()
    b = data(0)
    out = net(b)
    return [LOSSES["a"](out["a"], b), LOSSES["b"](out["b"], b)], net


def trunk(net: Net):
    return [(n, p) for n, p in net.named_parameters() if n.startswith("trunk")]


def tg(*args, **kw):
    return G.task_gradients(*args, **kw)


def trainer(**kw) -> MultiTaskTrainer:
    kw = {"monitor_every": 3, "checkpoint_every": 5, **kw}
    return MultiTaskTrainer(kw.pop("model", None) or Net(), kw.pop("tasks", LOSSES), kw.pop("data", data), **kw)


def trained(folder: Path, **kw) -> Path:
    """A checkpoint folder of a short run (10 steps, checkpoints at 5 and 10)."""
    trainer(checkpoint=folder, **kw).fit(10, progress=False)
    return folder


@lru_cache(maxsize=1)
def digits():
    return WL.multidigits_tensors("train", n=64)


def frozen(net):
    return [(n, p.detach()) for n, p in trunk(net)]


def grad_inf_at_zero(o, b):  # finite loss (0), infinite gradient (d sqrt(x)/dx at 0)
    return (o - o.detach()).abs().sqrt().sum()


def bad_from(k: int):
    """Task a's loss, whose gradient turns infinite from its ``k``-th call (from 1) on."""
    calls = [0]

    def loss(o, b):
        calls[0] += 1
        return grad_inf_at_zero(o, b) if calls[0] >= k else LOSSES["a"](o, b)

    return loss


# (name, call(tmp_path), regex the WorkbenchError message must match)
ERRORS = [
    # --- task_gradients: losses
    ("one loss", lambda t: tg(two()[0][:1], trunk(two()[1])), r"at least two task losses, got 1"),
    ("no loss", lambda t: tg([], trunk(Net())), r"at least two task losses, got 0"),
    ("T=1 as a dict", lambda t: tg({"a": two()[0][0]}, trunk(Net())), r"at least two task losses, got 1"),
    ("losses None", lambda t: tg(None, trunk(Net())), r"losses must be a list \(or dict task -> loss\) of scalar tensors, got NoneType"),
    ("losses one tensor", lambda t: tg(two()[0][0], trunk(Net())), r"losses must be a list .* got Tensor"),
    ("NaN loss", lambda t: (lambda l, n: tg([l[0], l[1] * float("nan")], trunk(n)))(*two()), r"loss 1 is nan: not finite"),
    ("inf loss", lambda t: (lambda l, n: tg([l[0] * float("inf"), l[1]], trunk(n)))(*two()), r"loss 0 is inf: not finite"),
    ("-inf loss", lambda t: (lambda l, n: tg([l[0], -l[1] * float("inf")], trunk(n)))(*two()), r"loss 1 is -inf: not finite"),
    ("vector loss", lambda t: (lambda n: tg(list(n(data(0)).values()), trunk(n)))(Net()),
     r"loss 0 must be a scalar tensor, got Tensor \(8,\)"),
    ("python float loss", lambda t: (lambda l, n: tg([l[0], 1.0], trunk(n)))(*two()), r"loss 1 must be a scalar tensor, got float"),
    ("detached loss", lambda t: (lambda l, n: tg([l[0], l[1].detach()], trunk(n)))(*two()),
     r"loss 1 does not depend on any trainable parameter \(no graph\)"),
    ("loss off the shared parameters", lambda t: (lambda l, n: tg([l[0], n.heads["b"].bias.sum()], trunk(n)))(*two()),
     r"loss 1 does not depend on the shared parameters"),
    # --- task_gradients: parameters and settings
    ("no parameters", lambda t: tg(two()[0], []), r"no shared parameters given"),
    ("a module as params", lambda t: (lambda l, n: tg(l, n.trunk))(*two()),
     r"got a Sequential module; pass shared_parameters\(model, prefix\)"),
    ("params None", lambda t: tg(two()[0], None), r"params must be a list of \(name, parameter\) pairs or parameters, got NoneType"),
    ("frozen parameters", lambda t: (lambda l, n: tg(l, frozen(n)))(*two()), r"parameter 'trunk.0.weight' does not require grad"),
    ("a parameter twice", lambda t: (lambda l, n: tg(l, trunk(n) + trunk(n)[:1]))(*two()),
     r"parameter 'trunk.0.weight' is given twice \(also as 'trunk.0.weight'\)"),
    ("a bad pair", lambda t: (lambda l, n: tg(l, [("w", 3)]))(*two()), r"parameter 0 must be a tensor or a \(name, tensor\) pair, got tuple"),
    ("an int as extra", lambda t: (lambda l, n: tg(l, trunk(n), extra=[3]))(*two()),
     r"extra\[0\] must be a tensor that requires grad, got int"),
    ("unknown mode", lambda t: (lambda l, n: tg(l, trunk(n), mode="hessian"))(*two()), r"mode must be 'jacobian' or 'gramian', got 'hessian'"),
    ("tasks of the wrong length", lambda t: (lambda l, n: tg(l, trunk(n), tasks=["a"]))(*two()),
     r"tasks must name each of the 2 losses once, got \['a'\]"),
    ("tasks repeated", lambda t: (lambda l, n: tg(l, trunk(n), tasks=["a", "a"]))(*two()), r"tasks must name each of the 2 losses once"),
    ("unknown family", lambda t: (lambda l, n: tg(l, trunk(n), family="gptj"))(*two()), r"unknown layout family 'gptj'; known: gpt2"),
    ("block_depth 0", lambda t: (lambda l, n: tg(l, trunk(n), block_depth=0))(*two()), r"block_depth must be an integer >= 1 .*got 0"),
    ("block_depth -1", lambda t: (lambda l, n: tg(l, trunk(n), block_depth=-1))(*two()), r"block_depth must be an integer >= 1 .*got -1"),
    ("block_depth 1.5", lambda t: (lambda l, n: tg(l, trunk(n), block_depth=1.5))(*two()), r"block_depth must be an integer >= 1 .*got 1.5"),
    # --- representation_gradients
    ("features not a tensor", lambda t: G.representation_gradients(two()[0], [1, 2]),
     r"features must be a tensor the losses were computed from .*got list"),
    ("features without grad", lambda t: G.representation_gradients(two()[0], torch.zeros(3)),
     r"features must be a tensor .*got a tensor that does not require grad"),
    ("features off the graph", lambda t: G.representation_gradients(two()[0], torch.zeros(3, requires_grad=True)),
     r"loss 0 does not depend on the shared features"),
    ("one loss over features", lambda t: G.representation_gradients(two()[0][:1], torch.zeros(3, requires_grad=True)),
     r"at least two task losses, got 1"),
    # --- conflict metrics
    ("conflict_summary of a dict", lambda t: G.conflict_summary({"gramian": np.eye(2)}), r"takes a task_gradients result, got dict"),
    ("conflict_summary of None", lambda t: G.conflict_summary(None), r"takes a task_gradients result, got NoneType"),
    ("conflict_summary of a summary", lambda t: G.conflict_summary(G.conflict_summary((lambda l, n: tg(l, trunk(n)))(*two()))),
     r"takes a task_gradients result, got ConflictSummary"),
    ("a 2-d Gramian", lambda t: G.cosines_and_conflicts(np.eye(2)),
     r"Gramians must be N stacked square \[T, T\] matrices, shape \[N, T, T\], got shape \(2, 2\); add an axis"),
    ("a non-square Gramian", lambda t: G.cosines_and_conflicts(np.ones((1, 2, 3))), r"got shape \(1, 2, 3\)"),
    ("a NaN Gramian", lambda t: G.cosines_and_conflicts(np.full((1, 2, 2), np.nan)), r"Gramians hold NaN or inf entries"),
    ("an inf Gramian", lambda t: G.cosines_and_conflicts(np.array([[[np.inf, 0.0], [0.0, 1.0]]])), r"Gramians hold NaN or inf"),
    ("2-d cosines", lambda t: G.conflict_fractions(np.eye(2)), r"cosines must be N stacked square"),
    ("non-square mean cosine", lambda t: G.mean_pair_cosine(np.ones((2, 3))), r"cosines must be \[\.\.\., T, T\] square matrices"),
    ("1-d magnitude similarity", lambda t: G.magnitude_similarity(np.ones(3)), r"Gramians must be \[\.\.\., T, T\] square"),
    ("a NaN gramian in a loaded result", lambda t: G.conflict_summary(_nan_result(t)), r"Gramians hold NaN or inf"),
    # --- lower-level helpers
    ("shared_parameters of a string", lambda t: G.shared_parameters("net"), r"takes a torch.nn.Module, got str"),
    ("shared_parameters unknown prefix", lambda t: G.shared_parameters(Net(), "body"), r"no trainable parameters under 'body' in Net"),
    ("shared_parameters prefix not a string", lambda t: G.shared_parameters(Net(), 3), r"prefix must be a string"),
    ("block_gramians sizes vs width", lambda t: G.block_gramians(torch.ones(2, 5), [0, 0], [2, 2], 1),
     r"2 parameter sizes summing to 4 .* a Jacobian of 5 columns"),
    ("block_gramians block out of range", lambda t: G.block_gramians(torch.ones(2, 4), [0, 3], [2, 2], 1),
     r"block indices must lie in 0\.\.0, got \[0, 3\]"),
    ("block_gramians 1-d", lambda t: G.block_gramians(torch.ones(4), [0], [4], 1), r"takes a \[tasks, params\] Jacobian, got \(4,\)"),
    ("gram64 1-d", lambda t: G.gram64(torch.ones(5)), r"gram64 takes a \[tasks, entries\] tensor, got \(5,\)"),
    ("jacobian of nothing", lambda t: G.jacobian(two()[0], []), r"no shared parameters given"),
    ("parameter_blocks depth 0", lambda t: G.parameter_blocks(["a.b.c"], None, depth=0), r"block_depth must be an integer >= 1"),
    ("check_losses of a string", lambda t: G.check_losses("ab"), r"losses must be a list .*got str"),
    # --- trainer: construction
    ("tasks as a list", lambda t: trainer(tasks=[LOSSES["a"], LOSSES["b"]]), r"tasks must be a dict task name -> loss function"),
    ("one task", lambda t: trainer(tasks={"a": LOSSES["a"]}), r"at least two tasks, got \['a'\]"),
    ("a loss that is not callable", lambda t: trainer(tasks={"a": LOSSES["a"], "b": 2}), r"the loss of task 'b' must be a function"),
    ("a task named by an int", lambda t: trainer(tasks={"a": LOSSES["a"], 1: LOSSES["b"]}), r"task names must be non-empty strings, got 1"),
    ("data not callable", lambda t: trainer(data=[data(0)]), r"data must be a function step -> batch .*got list"),
    ("model not a module", lambda t: trainer(model="net"), r"model must be a torch.nn.Module .*got str"),
    ("unknown aggregator", lambda t: trainer(aggregator="adam"), r"unknown aggregator 'adam'; valid: equal, mean, pcgrad"),
    ("lr 0", lambda t: trainer(lr=0), r"lr must be a finite number > 0, got 0"),
    ("lr negative", lambda t: trainer(lr=-1e-3), r"lr must be a finite number > 0, got -0.001"),
    ("lr NaN", lambda t: trainer(lr=float("nan")), r"lr must be a finite number > 0, got nan"),
    ("lr a string", lambda t: trainer(lr="1e-3"), r"lr must be a finite number > 0, got '1e-3'"),
    ("monitor_every 0", lambda t: trainer(monitor_every=0), r"monitor_every must be an integer >= 1, got 0"),
    ("monitor_every 1.5", lambda t: trainer(monitor_every=1.5), r"monitor_every must be an integer >= 1, got 1.5"),
    ("checkpoint_every 0", lambda t: trainer(checkpoint_every=0), r"checkpoint_every must be an integer >= 1, got 0"),
    ("seed a string", lambda t: trainer(seed="x"), r"seed must be an integer, got 'x'"),
    ("affinity a string", lambda t: trainer(affinity="yes"), r"affinity must be True or False, got 'yes'"),
    ("block_depth 0 in the trainer", lambda t: trainer(block_depth=0), r"block_depth must be an integer >= 1"),
    ("unknown family in the trainer", lambda t: trainer(family="nonsense"), r"unknown layout family 'nonsense'"),
    ("no shared prefix match", lambda t: trainer(shared_prefix="body"), r"no parameters start with 'body'"),
    ("unknown aggregator parameter", lambda t: trainer(aggregator="pcgrad", aggregator_params={"c": 1}),
     r"aggregator 'pcgrad' takes no parameter\(s\) \['c'\]; it accepts \[.*'seed'.*\]"),
    ("parameters for a parameterless aggregator", lambda t: trainer(aggregator="mgda", aggregator_params={"iters": 3}),
     r"aggregator 'mgda' takes no parameter\(s\) \['iters'\]; it accepts none"),
    ("unknown stateful parameter", lambda t: trainer(aggregator="gradnorm", aggregator_params={"beta": 1}),
     r"aggregator 'gradnorm' takes no parameter\(s\) \['beta'\]; it accepts \[.*'alpha'.*\]"),
    ("aggregator_params not a dict", lambda t: trainer(aggregator_params=[1]), r"aggregator_params must be a dict .*got list"),
    ("set_aggregator to an unknown one", lambda t: trainer().set_aggregator("sgd"), r"unknown aggregator 'sgd'"),
    ("set_aggregator with a bad parameter", lambda t: trainer().set_aggregator("cagrad", {"cc": 1}),
     r"aggregator 'cagrad' takes no parameter\(s\) \['cc'\]; it accepts \[.*'c'.*\]"),
    # --- trainer: what the model and the losses give
    ("forward without a task", lambda t: trainer(tasks={"a": LOSSES["a"], "c": LOSSES["b"]}).fit(1, progress=False),
     r"the model's output has no entry for task\(s\) \['c'\]; it has \['a', 'b'\]"),
    ("forward returns a tensor", lambda t: trainer(model=_TensorNet()).fit(1, progress=False),
     r"forward\(batch\) must return a dict task -> output, got Tensor"),
    ("a vector loss", lambda t: trainer(tasks={"a": lambda o, b: o, "b": LOSSES["b"]}, monitor_every=5).fit(3, progress=False),
     r"the loss function of task 'a' must return a scalar tensor, got a tensor of shape \(8,\)"),
    ("a float loss", lambda t: trainer(tasks={"a": lambda o, b: 1.0, "b": LOSSES["b"]}).fit(1, progress=False),
     r"the loss function of task 'a' must return a scalar tensor, got float"),
    ("a detached loss", lambda t: trainer(tasks={"a": lambda o, b: o.detach().sum(), "b": LOSSES["b"]}).fit(1, progress=False),
     r"the loss of task 'a' does not depend on any trainable parameter"),
    ("fit with steps as a string", lambda t: trainer().fit("3", progress=False), r"steps must be an integer >= 0 .*got '3'"),
    ("fit with negative steps", lambda t: trainer().fit(-1, progress=False), r"steps must be an integer >= 0 .*got -1"),
    ("fit with fractional steps", lambda t: trainer().fit(2.5, progress=False), r"steps must be an integer >= 0 .*got 2.5"),
    # --- trainer: checkpoints
    ("checkpoint is a file", lambda t: trainer(checkpoint=_file(t / "notes.txt")), r"checkpoint '.*notes.txt' is a file; pass a folder"),
    ("a foreign manifest", lambda t: trainer(checkpoint=_foreign(t)), r"is not a workbench MTL training checkpoint"),
    ("a truncated manifest", lambda t: trainer(checkpoint=_cut(trained(t / "ck"), "mtl_state.json")),
     r"MTL training checkpoint '.*mtl_state.json' is not valid JSON .*truncated by an interrupted write"),
    ("a truncated tensor file", lambda t: trainer(checkpoint=_cut(trained(t / "ck"), "*.safetensors")),
     r"does not match the SHA-256 its manifest records"),
    ("a missing tensor file", lambda t: trainer(checkpoint=_drop(trained(t / "ck"))), r"tensor file '.*mtl_state-[0-9a-f]{16}\.safetensors' does not exist"),
    ("a manifest without keys", lambda t: trainer(checkpoint=_strip(trained(t / "ck"), "param_groups")),
     r"lacks the key\(s\) \['param_groups'\]"),
    ("save into a file", lambda t: trainer().save(_file(t / "f")), r"checkpoint '.*f' is a file; pass a folder"),
    # --- trainer: resume with changed settings (the checkpoint is kept, the trainer refuses)
    ("resume with another lr", lambda t: trainer(checkpoint=trained(t / "ck"), lr=0.5),
     r"written with other settings \(lr: checkpoint 0.001, this trainer 0.5\)"),
    ("resume with another monitor_every", lambda t: trainer(checkpoint=trained(t / "ck"), monitor_every=4),
     r"monitor_every: checkpoint 3, this trainer 4"),
    ("resume with another seed", lambda t: trainer(checkpoint=trained(t / "ck"), seed=7), r"seed: checkpoint 0, this trainer 7"),
    ("resume with affinity on", lambda t: trainer(checkpoint=trained(t / "ck"), affinity=True), r"affinity: checkpoint False, this trainer True"),
    ("resume with the tasks reordered", lambda t: trainer(checkpoint=trained(t / "ck"), tasks={"b": LOSSES["b"], "a": LOSSES["a"]}),
     r"tasks: checkpoint \['a', 'b'\], this trainer \['b', 'a'\]"),
    ("resume with another block_depth", lambda t: trainer(checkpoint=trained(t / "ck"), block_depth=1), r"block_depth: checkpoint 2, this trainer 1"),
    ("resume with another aggregator", lambda t: trainer(checkpoint=trained(t / "ck"), aggregator="mgda"),
     r"was training with 'equal' \{\}; this trainer has 'mgda' \{\}"),
    ("resume with other aggregator parameters", lambda t: trainer(checkpoint=trained(t / "ck", aggregator="pcgrad"), aggregator="pcgrad",
                                                                  aggregator_params={"seed": 9}),
     r"was training with 'pcgrad' \{\}; this trainer has 'pcgrad' \{'seed': 9\}"),
    ("resume with a smaller trunk", lambda t: trainer(checkpoint=trained(t / "ck"), model=Net(bias=False)),
     r"n_shared: checkpoint 72, this trainer 66"),
    # --- trainer: numbers going bad
    ("a NaN loss stops training", lambda t: trainer(tasks={"a": lambda o, b: o.sum() * float("nan"), "b": LOSSES["b"]}).fit(1, progress=False),
     r"task 'a' has a non-finite loss \(nan\) at step 0; training stopped, the last checkpoint is unchanged"),
    ("an inf loss stops training", lambda t: trainer(tasks={"a": LOSSES["a"], "b": lambda o, b: o.pow(2).sum() * float("inf")}).fit(1, progress=False),
     r"task 'b' has a non-finite loss \(inf\) at step 0"),
    ("an inf gradient on a plain step", lambda t: trainer(tasks={"a": bad_from(2), "b": LOSSES["b"]}, monitor_every=100).fit(3, progress=False),
     r"non-finite gradients at step 1 in \['trunk.0.weight'.*before the update, the weights and the last checkpoint are unchanged"),
    ("an inf gradient under pcgrad, unmonitored", lambda t: trainer(tasks={"a": bad_from(2), "b": LOSSES["b"]}, aggregator="pcgrad",
                                                                     monitor_every=100).fit(3, progress=False),
     r"task\(s\) \['a'\] have non-finite gradients at step 1; training stopped before the update"),
    ("an inf gradient on a monitored step", lambda t: trainer(tasks={"a": grad_inf_at_zero, "b": LOSSES["b"]}, monitor_every=1).fit(1, progress=False),
     r"task\(s\) \['a'\] have non-finite gradients at step 0"),
    # --- transfer, task groups, lookahead affinity
    ("transfer with a task missing", lambda t: TR.transfer({"a": 1.0, "b": 1.0}, {"a": 1.0}),
     r"single and multi must name the same tasks; only in single: \['b'\], only in multi: \[\]"),
    ("transfer with an extra task", lambda t: TR.transfer({"a": 1.0}, {"a": 1.0, "b": 2.0}), r"only in multi: \['b'\]"),
    ("transfer from a zero baseline", lambda t: TR.transfer({"a": 0.0}, {"a": 1.0}), r"task 'a': baseline 0.0 and multi-task 1.0 give no transfer value"),
    ("transfer of NaN", lambda t: TR.transfer({"a": float("nan")}, {"a": 1.0}), r"task 'a': baseline nan"),
    ("transfer of a string", lambda t: TR.transfer({"a": "x"}, {"a": 1.0}), r"task 'a': baseline 'x' and multi-task 1.0 must be numbers"),
    ("transfer of lists", lambda t: TR.transfer([1.0], [1.0]), r"transfer takes two dicts"),
    ("more groups than tasks", lambda t: TR.task_groups(np.zeros((2, 2)), ["a", "b"], 3), r"n_groups must be an integer from 1 to the number of tasks \(2\), got 3"),
    ("zero groups", lambda t: TR.task_groups(np.zeros((2, 2)), ["a", "b"], 0), r"n_groups must be an integer from 1 .* got 0"),
    ("NaN affinity", lambda t: TR.task_groups(np.full((3, 3), np.nan), list("abc"), 2), r"affinity holds NaN or inf"),
    ("affinity of the wrong shape", lambda t: TR.task_groups(np.zeros((2, 3)), ["a", "b"]), r"affinity is \(2, 3\), expected \(2, 2\)"),
    ("too many tasks to search", lambda t: TR.task_groups(np.zeros((13, 13)), [str(i) for i in range(13)], 3),
     r"exhaustive search over 3\^13 groupings of 13 tasks is too slow"),
    ("lookahead with a Jacobian of the wrong width", lambda t: _lookahead(torch.ones(2, 3)), r"jacobian must be \[tasks, 2\] .*got \(2, 3\)"),
    ("lookahead with lr 0", lambda t: _lookahead(torch.ones(2, 2), lr=0), r"lr must be a finite number > 0, got 0"),
    ("lookahead with too few losses", lambda t: _lookahead(torch.ones(3, 2)), r"losses_at\(\) gives 2 losses for a Jacobian of 3 tasks"),
    # --- workloads
    ("MultiDigitsNet of width 0", lambda t: WL.MultiDigitsNet(hidden=0), r"hidden must be an integer >= 1, got 0"),
    ("multidigits of -1 rows", lambda t: WL.multidigits_tensors("train", n=-1), r"n must be an integer >= 1, got -1"),
    ("multidigits of no rows", lambda t: WL.multidigits_tensors("train", n=0), r"n must be an integer >= 1, got 0"),
    ("multidigits of an unknown split", lambda t: WL.multidigits_tensors("val"), r"unknown split 'val'; use 'train', 'test' or 'all'"),
    ("batch_sampler of size 0", lambda t: WL.batch_sampler(digits(), 0), r"batch_size must be an integer >= 1, got 0"),
    ("batch_sampler of size -2", lambda t: WL.batch_sampler(digits(), -2), r"batch_size must be an integer >= 1, got -2"),
    ("batch_sampler over no rows", lambda t: WL.batch_sampler({"x": torch.zeros(0, 3)}, 4), r"data holds no rows"),
    ("batch_sampler over unequal rows", lambda t: WL.batch_sampler({"x": torch.zeros(10, 3), "y": torch.zeros(4)}, 4),
     r"the tensors of data must have the same number of rows, got \{'x': 10, 'y': 4\}"),
    ("batch_sampler of an empty dict", lambda t: WL.batch_sampler({}, 4), r"non-empty dict name -> tensor .*got an empty dict"),
    ("batch_sampler of lists", lambda t: WL.batch_sampler({"x": [1, 2]}, 4), r"got values \['list'\]"),
    ("accuracy without labels", lambda t: WL.accuracy(WL.MultiDigitsNet(), {"image": torch.zeros(2, 8, 16)}),
     r"data has no labels for task\(s\) \['left', 'right'\] \(it holds \['image'\]\)"),
    ("text tasks as a string", lambda t: WL.TextTasks("capitalize"), r"tasks and same_prompts must be lists of task names, got the string 'capitalize'"),
    ("one text task", lambda t: WL.TextTasks(("capitalize",), same_prompts=()), r"need at least two distinct tasks, got \['capitalize'\]"),
    ("an unknown text task", lambda t: WL.TextTasks(("capitalize", "nope"), same_prompts=()), r"unknown task 'nope'; valid tasks: antonym"),
    ("same prompts of one task", lambda t: WL.TextTasks(("capitalize", "antonym"), same_prompts=("capitalize",)),
     r"same_prompts must name two or more of the tasks"),
    ("same prompts without common words", lambda t: WL.TextTasks(("capitalize", "country_capital"),
                                                                  same_prompts=("capitalize", "country_capital")),
     r"no words left for capitalize \(train\), .*share no input words"),
    ("text tasks on an encoder", lambda t: WL.TextTasks(model="minilm"), r"needs a model with an LM head; 'minilm' has none"),
    ("text sampler of 0 rows", lambda t: _text().sampler(0), r"batch_per_task must be an integer >= 1, got 0"),
    ("text sampler of an unknown split", lambda t: _text().sampler(2, split="val"), r"unknown split 'val'; use 'train' or 'test'"),
    ("text batch of an unknown split", lambda t: _text().batch("dev"), r"unknown split 'dev'"),
    ("text accuracy of an unknown split", lambda t: _text().accuracy(None, split="all"), r"unknown split 'all'"),
]


class _TensorNet(Net):
    def forward(self, batch):
        return self.trunk(batch["x"])


def _file(path: Path) -> Path:
    path.write_text("the user's notes")
    return path


def _foreign(t: Path) -> Path:
    (t / "ck").mkdir()
    (t / "ck" / "mtl_state.json").write_text(json.dumps({"format": "someone-else", "step": 3}))
    return t / "ck"


def _cut(folder: Path, pattern: str) -> Path:
    for p in folder.glob(pattern):
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return folder


def _drop(folder: Path) -> Path:
    for p in folder.glob("*.safetensors"):
        p.unlink()
    return folder


def _strip(folder: Path, key: str) -> Path:
    m = json.loads((folder / "mtl_state.json").read_text())
    del m[key]
    (folder / "mtl_state.json").write_text(json.dumps(m))
    return folder


def _nan_result(t: Path):
    res = (lambda l, n: tg(l, trunk(n)))(*two())
    res["gramian"][0, 0] = np.nan
    return Result.load(res.save(t / "nan.safetensors"))


def _lookahead(jac, lr=0.1):
    w = nn.Parameter(torch.zeros(2))
    return TR.lookahead_affinity(lambda: [(w - 1).pow(2).sum() + 1, (w + 1).pow(2).sum() + 1], [w], jac, lr)


@lru_cache(maxsize=1)
def _text():
    return WL.TextTasks(("capitalize", "first_letter"), same_prompts=("capitalize", "first_letter"))


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_gets_a_clear_error(tmp_path, name, call, match):
    with pytest.raises(WorkbenchError) as info:
        call(tmp_path)
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"


def _scaled(a: float, b: float):
    l, n = two()
    return tg([l[0] * a if a else l[0] * 0, l[0] * b], trunk(n))


def _history_equal(a: TrainingHistory, b: TrainingHistory) -> bool:
    return a.coord("step") == b.coord("step") and all(np.array_equal(a[v], b[v], equal_nan=True) for v in a.variables)


# (name, call(tmp_path), check(result)) -- odd but valid inputs get the right answer
VALUES = [
    ("params as a generator equal params as a list",
     lambda t: ((lambda l, n: tg(l, (p for p in trunk(n))))(*two()), (lambda l, n: tg(l, trunk(n)))(*two())),
     lambda r: np.array_equal(r[0]["gramian"], r[1]["gramian"])),
    ("bare parameters are named param0..", lambda t: (lambda l, n: tg(l, [p for _, p in trunk(n)]))(*two()),
     lambda r: r.blocks == ["param0", "param1", "param2", "param3"]),
    ("a dict of losses names the tasks", lambda t: (lambda l, n: tg({"x": l[0], "y": l[1]}, trunk(n)))(*two()),
     lambda r: r.coord("task") == ["x", "y"]),
    ("losses of shape [1] and [1, 1] count as scalars", lambda t: (lambda l, n: tg([l[0].reshape(1), l[1].reshape(1, 1)], trunk(n)))(*two()),
     lambda r: r.n_tasks == 2 and np.isfinite(r["gramian"]).all()),
    ("duplicate gradients: cosine 1, no conflict", lambda t: _scaled(1.0, 1.0),
     lambda r: np.isclose(r["cosine"][0, 1], 1) and G.conflict_summary(r).conflict_fraction == 0),
    ("opposite gradients: cosine -1, full conflict", lambda t: _scaled(1.0, -1.0),
     lambda r: np.isclose(r["cosine"][0, 1], -1) and G.conflict_summary(r).conflict_fraction == 1),
    ("scaled gradients: cosine 1, magnitude similarity 2*3/(1+9)", lambda t: _scaled(1.0, 3.0),
     lambda r: np.isclose(r["cosine"][0, 1], 1) and np.isclose(G.conflict_summary(r)["magnitude_similarity"][0, 1], 0.6)),
    ("a zero gradient: NaN cosine, left out of the conflict fraction", lambda t: _scaled(0.0, 1.0),
     lambda r: np.isnan(r["cosine"][0, 1]) and r["norm"][0] == 0 and G.conflict_summary(r).conflict_fraction == 0
     and np.isnan(G.conflict_summary(r).mean_cosine)),
    ("float16 losses and parameters", lambda t: _half(),
     lambda r: r.n_tasks == 2 and r["gramian"].dtype == np.float64 and np.isfinite(r["gramian"]).all()),
    ("T=1 Gramians: no pairs, conflict fraction 0", lambda t: G.cosines_and_conflicts(np.ones((1, 1, 1))),
     lambda r: r[1].tolist() == [0.0] and r[0].tolist() == [[[1.0]]]),
    ("mean cosine of one task is NaN", lambda t: G.mean_pair_cosine(np.ones((1, 1))), lambda r: np.isnan(r)),
    ("magnitude similarity of two zero gradients is NaN", lambda t: G.magnitude_similarity(np.zeros((2, 2))),
     lambda r: np.isnan(r).all()),
    ("conflict_summary of a loaded result equals the fresh one",
     lambda t: (lambda res: (G.conflict_summary(res), G.conflict_summary(Result.load(res.save(t / "g.safetensors")))))(
         (lambda l, n: tg(l, trunk(n)))(*two())),
     lambda r: all(np.array_equal(r[0][v], r[1][v], equal_nan=True) for v in r[0].variables)),
    ("gramian mode keeps no Jacobian", lambda t: (lambda l, n: tg(l, trunk(n), mode="gramian"))(*two()),
     lambda r: r.jacobian is None and r["block_gramian"].sum(0) == pytest.approx(r["gramian"])),
    ("aggregator parameters reach a stateful aggregator", lambda t: trainer(aggregator="uncertainty", aggregator_params={"lr": 0.5}),
     lambda r: r.state_agg.lr == 0.5),
    ("aggregator parameters reach a stateless one", lambda t: (lambda tr: (tr.fit(1, progress=False), tr)[1])(
        trainer(aggregator="cagrad", aggregator_params={"c": 0.1})),
     lambda r: r.history.attrs["aggregators"][0]["params"] == {"c": 0.1}),
    ("fit(0) trains nothing", lambda t: trainer().fit(0, progress=False), lambda r: r.coord("step") == [] and r.attrs["trained_steps"] == 0),
    ("fit to fewer steps than done is a no-op", lambda t: (lambda tr: (tr.fit(4, progress=False), tr.fit(2, progress=False))[1])(trainer()),
     lambda r: r.attrs["trained_steps"] == 4),
    ("a checkpoint folder with the user's files", lambda t: _users_folder(t), lambda r: r == ("the user's notes", 10)),
    ("a transfer improvement and a regression", lambda t: TR.transfer({"a": 0.5, "b": 0.4}, {"a": 0.4, "b": 0.5}),
     lambda r: r["a"] == pytest.approx(0.2) and r["b"] == pytest.approx(-0.25)),
    ("transfer with higher-is-better", lambda t: TR.transfer({"a": 0.5}, {"a": 0.6}, lower_is_better=False),
     lambda r: r["a"] == pytest.approx(0.2)),
    ("one group holds every task", lambda t: TR.task_groups(np.zeros((3, 3)), list("abc"), 1), lambda r: r == [["a", "b", "c"]]),
    ("as many groups as tasks", lambda t: TR.task_groups(np.ones((3, 3)), list("abc"), 3), lambda r: r == [["a"], ["b"], ["c"]]),
    ("a zero base loss gives a NaN affinity column", lambda t: _zero_base(),
     lambda r: np.isnan(r[:, 0]).all() and np.isfinite(r[:, 1]).all()),
    ("the history of a trainer that never trained", lambda t: trainer().history,
     lambda r: r.coord("step") == [] and r["block_cosine"].shape == (0, 2, 2, 2)),
]


def _half():
    n = Net().half()
    b = {k: v.half() for k, v in data(0).items()}
    o = n(b)
    return tg([LOSSES["a"](o["a"], b), LOSSES["b"](o["b"], b)], trunk(n))


def _users_folder(t: Path):
    folder = t / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's notes")
    trainer(checkpoint=folder).fit(10, progress=False)
    return (folder / "notes.txt").read_text(), trainer(checkpoint=folder).step_count


def _zero_base():
    w = nn.Parameter(torch.zeros(1))
    return TR.lookahead_affinity(lambda: [(w ** 2).sum(), (w - 1).pow(2).sum()], [w], torch.tensor([[0.0], [-2.0]]), 0.1)


@pytest.mark.parametrize("name,call,check", VALUES, ids=[c[0] for c in VALUES])
def test_odd_but_valid_input_gets_the_right_answer(tmp_path, name, call, check):
    assert check(call(tmp_path)), name


# ---------------------------------------------------------------------- no data loss


def test_refused_checkpoints_are_left_as_they_were(tmp_path):
    """A path that is a file, a foreign manifest, a damaged checkpoint, a checkpoint of other
    settings: each is refused and not one byte on disk changes."""
    f = _file(tmp_path / "notes.txt")
    foreign = _foreign(tmp_path)
    other = trained(tmp_path / "other")
    cut = _cut(trained(tmp_path / "cut"), "*.safetensors")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for ck, kw in ((f, {}), (foreign, {}), (other, {"lr": 0.5}), (cut, {})):
        with pytest.raises(WorkbenchError):
            trainer(checkpoint=ck, **kw).fit(10, progress=False)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_users_tmp_sibling_is_never_touched(tmp_path):
    """Earlier versions wrote ``<checkpoint>.tmp`` beside the checkpoint and renamed it: a
    user's file of that name was overwritten, then moved away."""
    (tmp_path / "run.tmp").write_text("user data")
    (tmp_path / "run.pt.tmp").write_text("more user data")
    trainer(checkpoint=tmp_path / "run.pt", checkpoint_every=1).fit(3, progress=False)
    assert (tmp_path / "run.tmp").read_text() == "user data"
    assert (tmp_path / "run.pt.tmp").read_text() == "more user data"


def test_a_non_finite_gradient_never_reaches_the_checkpoint(tmp_path):
    """The loss is finite but its gradient is not: training stops before the update, so
    the weights in memory and the checkpoint on disk are the last finite ones."""
    calls = {"n": 0}

    def sometimes_bad(o, b):
        calls["n"] += 1
        return grad_inf_at_zero(o, b) if calls["n"] == 7 else LOSSES["a"](o, b)

    tr = trainer(tasks={"a": sometimes_bad, "b": LOSSES["b"]}, checkpoint=tmp_path / "ck", checkpoint_every=1,
                 monitor_every=100)
    with pytest.raises(TrainingStopped, match="non-finite gradients at step 6"):
        tr.fit(20, progress=False)
    assert tr.step_count == 6 and all(torch.isfinite(p).all() for p in tr.model.parameters())
    again = trainer(tasks={"a": sometimes_bad, "b": LOSSES["b"]}, checkpoint=tmp_path / "ck", checkpoint_every=1,
                    monitor_every=100)
    assert again.step_count == 6
    for p, q in zip(tr.model.parameters(), again.model.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------- interrupts

from tests.reliability.interrupts import STEPS, DiskFull, instrument  # noqa: E402,F401


KW = dict(aggregator="gradnorm", monitor_every=3, checkpoint_every=10, affinity=True, seed=4)


def weights(tr: MultiTaskTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_checkpoint_interrupted_at_every_step_resumes_exactly(tmp_path, monkeypatch, exc):
    ref = trainer(model=Net(seed=2), **KW)
    ref.fit(30, progress=False)
    states = {}
    real_commit = storage.commit

    def recording_commit(folder, name, manifest, tensors, **kw):
        states[manifest["step"]] = {k: v.clone() for k, v in tensors.items()}
        return real_commit(folder, name, manifest, tensors, **kw)

    with monkeypatch.context() as m:
        m.setattr(storage, "commit", recording_commit)
        calls = instrument(m)
        trainer(model=Net(seed=2), checkpoint=tmp_path / "probe", **KW).fit(30, progress=False)
    assert sorted(states) == [10, 20, 30]
    first = ["write_tensors", "replace", "write_text", "replace"]
    assert calls == first + (first + ["remove"]) * 2, calls
    for i in range(5):  # each I/O step of the checkpoint at step 20
        folder = tmp_path / f"ck{i}"
        folder.mkdir()
        (folder / "notes.txt").write_text("the user's notes")
        with monkeypatch.context() as m:
            instrument(m, fail_at=len(first) + i, exc=exc)
            with pytest.raises(type(exc)):
                trainer(model=Net(seed=2), checkpoint=folder, **KW).fit(30, progress=False)
        meta = storage.read_json(folder / "mtl_state.json")
        t = storage.read_committed(folder, "mtl_state.json", "checkpoint", manifest=meta)
        assert meta["step"] == (20 if i == 4 else 10), (i, meta["step"])
        saved = states[meta["step"]]
        assert t.keys() == saved.keys() and all(torch.equal(t[k], saved[k]) for k in t), f"step {i}: a mix"
        assert (folder / "notes.txt").read_text() == "the user's notes"
        again = trainer(model=Net(seed=2), checkpoint=folder, **KW)
        assert again.step_count == meta["step"]
        again.fit(30, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(ref).values())), i
        assert _history_equal(again.history, ref.history), i
        assert again.history.attrs == ref.history.attrs
        names = sorted(p.name for p in folder.iterdir())  # what the interrupted write left is cleared
        assert names == sorted(["mtl_state.json", "notes.txt", storage.read_json(folder / "mtl_state.json")["tensors"]["file"]])


@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_first_checkpoint_interrupted_starts_afresh(tmp_path, monkeypatch, exc):
    ref = trainer(model=Net(seed=3), **KW)
    ref.fit(20, progress=False)
    for i in range(4):
        folder = tmp_path / f"ck{i}"
        with monkeypatch.context() as m:
            instrument(m, fail_at=i, exc=exc)
            with pytest.raises(type(exc)):
                trainer(model=Net(seed=3), checkpoint=folder, **KW).fit(20, progress=False)
        assert not (folder / "mtl_state.json").exists()
        again = trainer(model=Net(seed=3), checkpoint=folder, **KW)
        assert again.step_count == 0
        again.fit(20, progress=False)  # its commits clear what the interrupted one left
        assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(ref).values()))
        assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors"]


def test_no_pickle_in_a_checkpoint(tmp_path):
    trainer(checkpoint=tmp_path / "ck", aggregator="uncertainty").fit(10, progress=False)
    for p in (tmp_path / "ck").iterdir():
        assert p.suffix in (".json", ".safetensors"), p
        assert p.read_bytes()[:2] != b"\x80\x04" and p.read_bytes()[:2] != b"PK", p


# ---------------------------------------------------------------------- spaces of inputs

FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
values = st.sampled_from([0.5, -2.0, 3.0, float("nan"), float("inf"), float("-inf")])


@FAST
@given(st.lists(values, min_size=2, max_size=5))
def test_non_finite_losses_are_named_wherever_they_are(vals):
    w = nn.Parameter(torch.ones(3))
    losses = [w.sum() * 0 + v for v in vals]
    bad = [i for i, v in enumerate(vals) if not np.isfinite(v)]
    if not bad:
        assert G.check_losses(losses) == losses
        return
    with pytest.raises(WorkbenchError, match=rf"^loss {bad[0]} is {re.escape(str(vals[bad[0]]))}: not finite"):
        G.check_losses(losses)


@FAST
@given(st.integers(2, 5), st.integers(2, 7), st.data())
def test_conflict_summary_of_any_jacobian(T, P, draw):
    """Gramians from random integer Jacobians (exact in float32), some rows zero: cosines are
    symmetric, in [-1, 1], 1 on the diagonal of non-zero rows, NaN with a zero row; the
    conflict fraction is the share of negative pairs among pairs of non-zero rows."""
    J = np.array(draw.draw(st.lists(st.lists(st.integers(-3, 3), min_size=P, max_size=P), min_size=T, max_size=T)),
                 dtype=np.float64)
    split = draw.draw(st.integers(1, P - 1))
    a, b = nn.Parameter(torch.zeros(split)), nn.Parameter(torch.zeros(P - split))
    Jt = torch.tensor(J, dtype=torch.float32)
    losses = [(Jt[t, :split] * a).sum() + (Jt[t, split:] * b).sum() + 1.0 for t in range(T)]
    res = tg(losses, [("first.w", a), ("second.w", b)])
    s = G.conflict_summary(res)
    assert np.allclose(res["gramian"], J @ J.T) and np.allclose(res["block_gramian"].sum(0), res["gramian"])
    cos = s["cosine"]
    nz = np.abs(J).sum(1) > 0
    assert np.array_equal(np.isnan(cos), ~(nz[:, None] & nz[None, :]))
    ok = ~np.isnan(cos)
    assert np.allclose(cos[ok], cos.T[ok]) and (np.abs(cos[ok]) <= 1 + 1e-12).all()
    assert np.allclose(np.diag(cos)[nz], 1)
    G64 = J @ J.T
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T) if nz[i] and nz[j]]
    want = sum(G64[i, j] < 0 for i, j in pairs) / len(pairs) if pairs else 0.0
    assert s.conflict_fraction == pytest.approx(want)
    assert s.block_frame()["block"].tolist() == res.blocks


names = st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
                 min_size=2, max_size=3, unique=True)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names, st.integers(0, 4), st.integers(1, 3), st.data())
def test_history_results_round_trip(tmp_path, tasks, n, B, draw):
    """Any history (odd task names, NaN/inf anywhere, several aggregator stretches) saves
    and loads exactly, as a TrainingHistory whose frame names the aggregator of each step."""
    T = len(tasks)
    sizes = {"step": n, "task": T, "task_b": T, "block": B}
    data_ = {}
    for name, dims in TR.HISTORY_DIMS.items():
        shape = [sizes[d] for d in dims]
        flat = draw.draw(st.lists(floats, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        data_[name] = (dims, np.array(flat, dtype=np.float64).reshape(shape))
    steps = sorted(draw.draw(st.lists(st.integers(0, 50), min_size=n, max_size=n, unique=True)))
    switch = draw.draw(st.integers(0, 50))
    aggs = [{"from_step": 0, "aggregator": "equal", "params": {}}, {"from_step": switch, "aggregator": "pcgrad",
                                                                     "params": {"seed": 1}}]
    h = TrainingHistory(dims={"step": steps, "task": tasks, "task_b": tasks, "block": [f"b{i}" for i in range(B)]},
                        data=data_, attrs={"aggregators": aggs, "trained_steps": 51})
    back = Result.load(h.save(tmp_path / "h.safetensors"))
    assert isinstance(back, TrainingHistory) and back.equals(h)
    frame = back.to_frame()
    assert len(frame) == n * T
    assert frame["aggregator"].tolist() == ["equal" if s < switch else "pcgrad" for s in frame["step"]]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from(["equal", "mgda", "uncertainty"]))
def test_resume_anywhere_is_bit_identical(stop, every, agg):
    """Stopping after any step, with a checkpoint at every ``every`` steps, and resuming
    ends exactly where an uninterrupted run ends (weights and history)."""
    import tempfile

    kw = dict(aggregator=agg, monitor_every=2, checkpoint_every=every, seed=1)
    ref = trainer(model=Net(seed=5), **kw)
    ref.fit(6, progress=False)
    with tempfile.TemporaryDirectory() as d:
        trainer(model=Net(seed=5), checkpoint=Path(d) / "ck", **kw).fit(stop, progress=False)
        again = trainer(model=Net(seed=5), checkpoint=Path(d) / "ck", **kw)
        assert again.step_count == stop // every * every
        again.fit(6, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights(again).values(), weights(ref).values()))
    assert _history_equal(again.history, ref.history)
