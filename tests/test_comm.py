"""The communication module: where collectives run for each backend, and that no other module makes any."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ltsft_dist import comm

PACKAGE = Path(__file__).resolve().parents[1] / "ltsft_dist"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather",
               "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list",
               "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced", "inference_all_reduce"}
COMM_MODULES = ("torch.distributed", "deepspeed.comm")


def collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every call of a torch.distributed / deepspeed.comm collective in `source`, through any
    import alias (`import torch.distributed as dist`, `from torch import distributed`, `from torch.distributed
    import all_reduce`) or the full dotted name."""
    tree = ast.parse(source)
    modules, functions = set(), set()  # local names bound to a comm module / to a collective function
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COMM_MODULES and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            calls.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            owner = ast.unparse(f.value)
            if owner in modules or owner in COMM_MODULES:
                calls.append((node.lineno, f"{owner}.{f.attr}"))
    return calls


def test_the_checker_finds_collectives_through_any_alias():
    source = ("import torch.distributed as dist\nimport torch\nfrom torch import distributed as d2\n"
              "from torch.distributed import all_gather_object as ago\nimport deepspeed.comm as dscomm\n"
              "dist.all_reduce(t)\ntorch.distributed.barrier()\nd2.broadcast(t, 0)\nago(out, obj)\n"
              "dscomm.all_reduce(t)\ndist.get_rank()\nx.all_reduce(t)\n")
    assert [line for line, _ in collective_calls(source)] == [6, 7, 8, 9, 10]


def test_only_the_communication_module_calls_collectives():
    """In the package and the benchmarks (the tests' own harness excepted)."""
    sources = sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE.parent / "bench").rglob("*.py"))
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
                 for path in sources if path != PACKAGE / "comm.py"
                 for line, name in collective_calls(path.read_text())]
    assert len(sources) > 40 and not offenders, "collectives outside ltsft_dist/comm.py:\n" + "\n".join(offenders)
    assert collective_calls((PACKAGE / "comm.py").read_text())  # the module itself is seen by the checker


# --- where a collective runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("config, expected", [
    ("nccl", {"cuda": "nccl"}),
    ("gloo", {"cpu": "gloo", "cuda": "gloo"}),
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
    ("cuda:nccl", {"cuda": "nccl"}),
])
def test_backend_devices(config, expected):
    assert comm.backend_devices(config) == expected


def test_under_nccl_control_values_go_to_the_current_gpu(monkeypatch):
    """NCCL serves CUDA only: a CPU tensor's collective runs on this process's GPU (the one bound at start-up),
    a CUDA tensor's where it is. With a CPU backend beside NCCL, CPU tensors stay."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    nccl = comm.backend_devices("nccl")
    assert comm.collective_device(torch.device("cpu"), nccl) == torch.device("cuda", 3)
    assert comm.collective_device(torch.device("cuda", 1), nccl) == torch.device("cuda", 1)
    mixed = comm.backend_devices("cpu:gloo,cuda:nccl")
    assert comm.collective_device(torch.device("cpu"), mixed) == torch.device("cpu")
    assert comm.collective_device(torch.device("cuda", 3), mixed) == torch.device("cuda", 3)
    gloo_cpu_only = {"cpu": "gloo"}
    assert comm.collective_device(torch.device("cuda", 0), gloo_cpu_only) == torch.device("cpu")


def test_all_reduce_in_place_on_a_served_device(monkeypatch):
    """Simulated two identical ranks (the sum doubles): the caller's own tensor is reduced, in place, without a
    copy, when the group serves its device. (The copy to a served device and back is checked on a GPU with
    NCCL: tests/test_gpu.py.)"""
    seen = []

    def fake_all_reduce(t):
        seen.append((t.device, t is original))
        t.mul_(2)

    monkeypatch.setattr(comm, "world_size", lambda: 2)
    monkeypatch.setattr(comm, "backend_devices", lambda config=None: {"cpu": "gloo"})
    monkeypatch.setattr(comm.dist, "all_reduce", fake_all_reduce)
    original = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert comm.all_reduce(original) is original and original.tolist() == [3.0, 4.0]
    assert seen == [(torch.device("cpu"), True)]


def test_object_collectives_carry_cpu_tensors_only(monkeypatch):
    """all_gather_object pickles tensors with their device; comm moves every tensor of the object to the CPU
    (here checked with a recording `move`: every tensor reaches the collective through it)."""
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    obj = {"x": [torch.ones(2), (torch.zeros(1), 3)], "p": Pair(torch.arange(3), "s")}
    moved = comm.move(obj, "cpu")
    assert isinstance(moved["p"], Pair) and moved["p"].b == "s" and isinstance(moved["x"][1], tuple)
    leaves = [moved["x"][0], moved["x"][1][0], moved["p"].a]
    assert all(t.device.type == "cpu" for t in leaves)

    gathered = {}

    def fake_all_gather_object(out, o):
        gathered["obj"] = o
        out[:] = [o, o]

    monkeypatch.setattr(comm, "world_size", lambda: 2)
    monkeypatch.setattr(comm.dist, "all_gather_object", fake_all_gather_object)
    calls = []
    real_move = comm.move
    monkeypatch.setattr(comm, "move", lambda o, device: calls.append(str(device)) or real_move(o, device))
    assert len(comm.all_gather_object(obj)) == 2
    assert calls == ["cpu"] and gathered["obj"]["p"].a.device.type == "cpu"


def test_single_process_collectives_are_identities():
    t = torch.tensor([5])
    assert comm.world_size() == 1 and comm.rank() == 0
    assert comm.all_reduce(t) is t and int(t) == 5
    assert comm.gather_object({"a": 1}) == [{"a": 1}] and comm.all_gather_object(2) == [2]
    comm.barrier()
