"""Device peaks for MFU: the GPU table, the override, and the cached CPU probe."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sectional_moe import hardware
from sectional_moe.errors import ConfigError
from sectional_moe.hardware import Peak, gpu_peak, lookup_gpu, peak_flops


# ---------------------------------------------------------------------------------------------- peak table
@pytest.mark.parametrize("name,dtype,tflops,key", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4, "h100-sxm"),
    ("NVIDIA H100 PCIe", "bf16", 756.0, "h100-pcie"),
    ("NVIDIA H100 NVL", "bf16", 835.5, "h100-nvl"),
    ("NVIDIA H200", "bf16", 989.4, "h200"),
    ("NVIDIA GH200 480GB", "bf16", 989.4, "h100-sxm"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0, "a100"),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5, "a100"),
    ("NVIDIA A100 80GB PCIe", "tf32", 156.0, "a100"),
    ("NVIDIA A10G", "bf16", 125.0, "a10"),
    ("NVIDIA L4", "bf16", 121.0, "l4"),
    ("NVIDIA L40S", "bf16", 362.05, "l40s"),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2, "rtx-4090"),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0, "v100-sxm"),
    ("Tesla V100-PCIE-32GB", "tf32", 14.0, "v100-pcie"),  # no TF32 cores: the fp32 rate
])
def test_gpu_names_map_to_dense_peaks(name, dtype, tflops, key):
    assert lookup_gpu(name) == key
    assert gpu_peak(name, dtype) == Peak(tflops * 1e12, f"table:{key}")


@pytest.mark.parametrize("name,dtype", [("NVIDIA Quantum X9000", "bf16"), ("Tesla V100-SXM2-16GB", "bf16"), ("", "fp32")])
def test_unknown_gpu_or_dtype_gives_no_peak(name, dtype):
    assert gpu_peak(name, dtype) == Peak(None, "unknown")
    # a CUDA device is never required: the name is passed in
    assert peak_flops("cuda", "bf16-mixed" if dtype == "bf16" else "32-true", device_name=name).flops_per_s is None


def test_override_wins_over_table_and_probe(tmp_path):
    assert peak_flops("cuda", "bf16-mixed", override_tflops=123.0, device_name="NVIDIA H100 80GB HBM3") == Peak(123e12, "override")
    assert peak_flops("cuda", "bf16-mixed", override_tflops=50, device_name="NVIDIA Quantum X9000") == Peak(50e12, "override")
    assert peak_flops("cpu", "32-true", override_tflops=0.5, cache_dir=tmp_path) == Peak(0.5e12, "override")
    assert not (tmp_path / "hardware").exists()  # no probe ran
    for bad in (0, -5, "fast", True):
        with pytest.raises(ConfigError) as err:
            peak_flops("cpu", override_tflops=bad)
        assert err.value.key == "hardware.peak_tflops"


def test_cpu_peak_is_probed_once_then_read_from_the_machine_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "load_average", lambda: 0.0)  # a quiet machine, whatever this one is doing
    monkeypatch.setattr(hardware.CpuLoadMeter, "sample", lambda self: None)
    first = peak_flops("cpu", "32-true", cache_dir=tmp_path)
    path = hardware.probe_cache_file(tmp_path)
    assert first.source == f"cpu-probe:{path}" and path.parent == tmp_path / "hardware"
    assert first.flops_per_s > 1e8  # any CPU of this decade does > 0.1 GFLOP/s in fp32
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda *a, **k: pytest.fail("probed again"))
    assert peak_flops("cpu", "32-true", cache_dir=tmp_path) == first


class FakeProbe:
    """The CPU probe without timing: queued rates, and a load / core / thread count set by the test."""

    def __init__(self, monkeypatch) -> None:
        self.rates: list[float] = []
        self.calls, self.load, self.cores, self.threads = 0, 0.0, 4, 2
        self.foreign: float | None = None  # other processes' busy cores during the probe (None: no /proc/stat)
        monkeypatch.setattr(hardware, "measure_matmul_flops", self._measure)
        monkeypatch.setattr(hardware.CpuLoadMeter, "sample", lambda meter: self.foreign)
        monkeypatch.setattr(hardware, "load_average", lambda: self.load)
        monkeypatch.setattr(hardware, "usable_cores", lambda: self.cores)
        monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: self.threads)

    def _measure(self, dtype: str, *args, **kwargs) -> float:
        self.calls += 1
        return self.rates.pop(0)

    def peak(self, cache_dir: Path, precision: str = "32-true", rate: float | None = None) -> float:
        if rate is not None:
            self.rates.append(rate)
        return peak_flops("cpu", precision, cache_dir=cache_dir).flops_per_s


def test_heavy_load_means_other_work_on_the_probes_cores():
    assert not hardware.heavy_load(None, 2, 2)  # no load average (Windows): trusted
    assert not hardware.heavy_load(0.4, 2, 2) and hardware.heavy_load(0.6, 2, 2)
    assert not hardware.heavy_load(1.4, 2, 1) and hardware.heavy_load(1.6, 2, 1)  # one core left idle
    assert not hardware.heavy_load(6.0, 16, 8) and hardware.heavy_load(9.0, 16, 8)


def test_cpu_probe_cache_is_trusted_only_when_quiet_and_at_the_same_thread_count(tmp_path, monkeypatch, caplog):
    probe = FakeProbe(monkeypatch)
    path = hardware.probe_cache_file(tmp_path)
    entries = lambda: json.loads(path.read_text())["probes"]  # noqa: E731

    # quiet (load 1.0 on 4 cores, 2 threads): probed once, recorded with its load and threads, then reused
    probe.load = 1.0
    with caplog.at_level(logging.INFO, logger="sectional_moe.hardware"):
        assert probe.peak(tmp_path, rate=100e9) == 100e9
    assert "CPU peak probe: 100.0 GFLOP/s fp32" in caplog.text and "WARNING" not in caplog.text.upper()
    e = entries()["fp32@2threads"]
    assert (e["threads"], e["cores"], e["loadavg_1m"], e["under_load"]) == (2, 4, 1.0, False)
    assert probe.peak(tmp_path) == 100e9 and probe.calls == 1

    # another thread count is another entry, probed once
    probe.threads, probe.load = 4, 0.2
    assert probe.peak(tmp_path, rate=180e9) == 180e9 and probe.calls == 2
    assert probe.peak(tmp_path) == 180e9 and probe.calls == 2
    e["threads"] = 4  # an entry whose recorded thread count disagrees with its key is not trusted either
    cache = json.loads(path.read_text())
    cache["probes"]["fp32@2threads"] = e
    path.write_text(json.dumps(cache))
    probe.threads = 2
    assert probe.peak(tmp_path, rate=90e9) == 90e9 and probe.calls == 3  # not comparable: replaced

    # under load (3.5 > the 2 idle cores + slack): the probe is used now, stored untrusted, warned about
    probe.load = 3.5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sectional_moe.hardware"):
        assert probe.peak(tmp_path, "bf16-mixed", rate=50e9) == 50e9
    assert any(r.levelno == logging.WARNING and "busy" in r.getMessage() for r in caplog.records)
    assert entries()["bf16@2threads"]["under_load"] is True and entries()["bf16@2threads"]["loadavg_1m"] == 3.5
    # ... so every later run probes again, keeping the best rate (a peak is only ever under-measured)
    assert probe.peak(tmp_path, "bf16-mixed", rate=40e9) == 50e9 and probe.calls == 5
    probe.load = 0.5
    assert probe.peak(tmp_path, "bf16-mixed", rate=120e9) == 120e9 and probe.calls == 6
    assert entries()["bf16@2threads"]["under_load"] is False
    assert probe.peak(tmp_path, "bf16-mixed") == 120e9 and probe.calls == 6  # quiet now: trusted
    probe.load = 9.0
    assert probe.peak(tmp_path, "bf16-mixed") == 120e9 and probe.calls == 6  # a trusted entry survives later load


def test_cpu_probe_entries_of_the_old_format_are_probed_again(tmp_path, monkeypatch):
    """Entries without a recorded load (the 0.25 s probe that once gave an MFU of ~0.9) are not trusted."""
    probe = FakeProbe(monkeypatch)
    path = hardware.probe_cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    old = {"flops_per_s": 3e9, "shape": [512, 512, 512], "torch": "2.5", "measured_at": "2025-01-01T00:00:00"}
    path.write_text(json.dumps({"probes": {"fp32@2threads": old}, "cpu_model": "x", "hostname": "h"}))
    assert probe.peak(tmp_path, rate=80e9) == 80e9 and probe.calls == 1
    assert probe.peak(tmp_path) == 80e9 and probe.calls == 1
    path.write_text("{not json")  # a corrupt cache is re-measured
    assert probe.peak(tmp_path, rate=70e9) == 70e9 and probe.calls == 2


# ---------------------------------------------------------------------------------------------- throughput


def test_the_probe_trusts_what_other_processes_did_during_it_over_the_load_average(tmp_path, monkeypatch):
    """A first run's load average counts its own tokenising and the install before it; other
    processes' CPU time during the probe decides whether the rate is trusted."""
    probe = FakeProbe(monkeypatch)
    probe.load, probe.foreign = 3.5, 0.1  # our own recent work, nobody else on the cores
    assert probe.peak(tmp_path, rate=100e9) == 100e9
    entry = json.loads(hardware.probe_cache_file(tmp_path).read_text())["probes"]["fp32@2threads"]
    assert entry["under_load"] is False and entry["foreign_busy_cores"] == 0.1
    probe.threads, probe.load, probe.foreign = 4, 0.0, 2.0  # a quiet load average, but two busy cores now
    probe.peak(tmp_path, rate=80e9)
    assert json.loads(hardware.probe_cache_file(tmp_path).read_text())["probes"]["fp32@4threads"]["under_load"] is True
