import math
from pathlib import Path

import pytest

from pipeline.budgets import GiB, GPUInfo, Hardware, default_budgets, detect_hardware, make_budgets
from pipeline.errors import ConfigError

# A made-up machine: two 16 GiB GPUs, 32 GiB RAM (24 available), 100 GiB free disk.
MACHINE = Hardware(
    gpus=(GPUInfo(0, "T4", 16 * GiB, 15 * GiB), GPUInfo(1, "T4", 16 * GiB, 16 * GiB)),
    ram_total=32 * GiB,
    ram_available=24 * GiB,
    disk_free=100 * GiB,
)
CPU_ONLY = Hardware(gpus=(), ram_total=8 * GiB, ram_available=6 * GiB, disk_free=10 * GiB)


def test_valid_budgets_parse_to_bytes() -> None:
    b = make_budgets(MACHINE, [2, "1.5"], "4", disk=True, offload_dir="off", disk_cap_gib=10)
    assert b.gpu == (2 * GiB, int(1.5 * GiB))
    assert b.cpu == 4 * GiB and b.disk and b.disk_cap == 10 * GiB
    assert b.max_memory() == {0: 2 * GiB, 1: int(1.5 * GiB), "cpu": 4 * GiB}
    only_first = make_budgets(MACHINE, [3], 1)
    assert only_first.gpu == (3 * GiB, 0) and only_first.max_memory() == {0: 3 * GiB, "cpu": GiB}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu_gib": [-1]}, "gpu_memory[0]=-1 is negative; accepted: 0 to 16.00 GiB"),
        ({"gpu_gib": [float("nan")]}, "gpu_memory[0]=nan is not a finite number"),
        ({"gpu_gib": ["lots"]}, "gpu_memory[0]='lots' is not a number"),
        ({"gpu_gib": [17]}, "gpu_memory[0]=17 GiB is more than this machine has; accepted: 0 to 16.00 GiB"),
        ({"gpu_gib": [1, 1, 1]}, "lists 3 GPU budget(s) but this machine has 2 GPU(s)"),
        ({"cpu_gib": -0.5}, "cpu_memory=-0.5 is negative"),
        ({"cpu_gib": math.inf}, "cpu_memory=inf is not a finite number"),
        ({"cpu_gib": "4GB"}, "cpu_memory='4GB' is not a number; accepted: 0 to 32.00 GiB"),
        ({"cpu_gib": 33}, "cpu_memory=33 GiB is more than this machine has"),
        ({"cpu_gib": None, "disk": True, "disk_cap_gib": 101}, "disk_cap=101 GiB is more than this machine has"),
        ({"cpu_gib": True}, "cpu_memory=True is not a number"),
        ({"gpu_gib": [0, 0], "cpu_gib": 0}, "all budgets are zero"),
        ({"disk": "yes"}, "disk='yes' must be true or false"),
    ],
)
def test_bad_budgets_name_value_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_budgets(MACHINE, **kwargs)
    assert message in str(info.value)


def test_gpu_budget_on_a_machine_without_gpu() -> None:
    with pytest.raises(ConfigError, match="this machine has no CUDA GPU"):
        make_budgets(CPU_ONLY, [4], 1)
    assert make_budgets(CPU_ONLY, [0], 1).gpu == ()  # a zero is harmless


def test_zero_cpu_with_disk_is_allowed() -> None:
    b = make_budgets(CPU_ONLY, [], 0, disk=True)
    assert b.cpu == 0 and b.disk


def test_defaults_leave_headroom() -> None:
    b = default_budgets(MACHINE, "off")
    assert all(budget <= g.free - GiB for budget, g in zip(b.gpu, MACHINE.gpus))
    assert b.gpu[0] > 10 * GiB
    assert b.cpu < MACHINE.ram_available and b.cpu > MACHINE.ram_available // 2
    assert b.disk and b.disk_cap < MACHINE.disk_free


def test_detect_hardware_reads_this_machine(tmp_path: Path) -> None:
    hw = detect_hardware(tmp_path / "not-yet-created")
    assert hw.ram_total > 0 and 0 < hw.ram_available <= hw.ram_total
    assert hw.disk_free > 0
    assert "RAM" in hw.describe()
