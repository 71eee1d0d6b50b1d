"""The benchmark scripts a GPU session runs (bench/): they must run, here, on the CPU.

Their numbers are only meaningful on a GPU; these tests guard the code paths (a GPU lent for
minutes must not be spent on a Python error) and the counting the dispatch benchmark does.
"""
import dataclasses
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from mrcnn_edu.data.coco import COCODataset
from mrcnn_edu.data.shapes import SHAPE_NAMES

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dispatch_counter_counts_ops_and_host_reads_exactly():
    counter_module = load("dispatch_counts")
    a, b = torch.ones(3), torch.arange(3.0)
    with counter_module.DispatchCounter() as counter:
        c = a + b  # 1 op
        c.sum().item()  # sum + the host read (_local_scalar_dense)
        (c > 1).nonzero()  # gt + nonzero, a host read (its size depends on the values)
        c.tolist()  # a read that dispatches no op
    assert counter.ops == 5
    assert counter.reads == {"_local_scalar_dense": 1, "nonzero": 1, "tolist": 1}
    # a random draw on the host's generator is read without a sync on a GPU too; one on a named
    # device (the model's), or anything computed from it, is counted
    with counter_module.DispatchCounter() as counter:
        torch.randint(4, (3,)).tolist()
        int(torch.randint(4, (), generator=torch.Generator().manual_seed(0)))
        torch.rand(2).tolist()
    assert counter.reads == {}
    with counter_module.DispatchCounter() as counter:
        torch.randint(4, (3,), device="cpu").tolist()
        (torch.rand(2) + 1).tolist()
        int(torch.randint(4, (), device=a.device))
    assert counter.reads == {"tolist": 2, "_local_scalar_dense": 1}


@pytest.fixture
def restore_gpu_stand_ins(monkeypatch):
    """Put back, after the test, what ``dispatch_counts.as_on_a_gpu`` patches in the package."""
    pytest.importorskip("torchvision")
    import mrcnn_edu.model  # noqa: F401  (one of the patched modules)

    for module, name in (("mrcnn_edu.ops.roi_align", "roi_align_torch"),
                         ("mrcnn_edu.ops.roi_pool", "roi_align_torch"),
                         ("mrcnn_edu.ops.roi_align", "cupy_available"),
                         ("mrcnn_edu.boxes", "check_boxes"), ("mrcnn_edu.model", "check_boxes"),
                         ("mrcnn_edu.boxes", "greedy_keep"), ("mrcnn_edu.boxes", "_takes_the_cpu_way"),
                         ("mrcnn_edu.roi_heads.mask_head", "_check_values")):
        monkeypatch.setattr(sys.modules[module], name, getattr(sys.modules[module], name))


@pytest.fixture
def as_on_a_gpu(restore_gpu_stand_ins):
    """``dispatch_counts.as_on_a_gpu`` for one test; returns the bench module."""
    counter_module = load("dispatch_counts")
    counter_module.as_on_a_gpu()
    return counter_module


def test_dispatch_counts_sites_add_up_and_name_our_functions(capsys, restore_gpu_stand_ins):
    counter_module = load("dispatch_counts")
    with counter_module.SiteCounter() as counter:
        from mrcnn_edu.boxes import box_area

        box_area(torch.tensor([[0.0, 0.0, 2.0, 3.0]]))
        torch.ones(2).sum()  # called from here, not from the package
    assert counter.sites["boxes.py:box_area"] > 0
    assert sum(counter.sites.values()) == counter.ops
    counter_module.main(["--sites", "r50_c4", "--size", "64", "--batches", "2"])
    out = capsys.readouterr().out
    total = int(re.search(r"training step on 2 images of 64 px: (\d+) ops", out).group(1))
    top = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+\d+\s+\S+$", out, re.M)]
    assert len(top) == 15 and top == sorted(top, reverse=True) and sum(top) <= total


def test_dispatch_counts_script_compares_with_torchvision(capsys, restore_gpu_stand_ins):
    counter_module = load("dispatch_counts")
    counter_module.main(["--size", "64", "--batches", "1"])
    out = capsys.readouterr().out
    assert re.search(r"ratio ours / torchvision at 1 images: train ops \d+\.\d\d", out)
    ours = re.search(r"ours R-50-FPN\s+1\s+(\d+)\s+(\d+)", out)
    assert ours and int(ours.group(1)) > 100  # it counted a real training step


def test_byte_counter_counts_what_ops_write_and_not_views():
    cost = load("input_size_cost")
    x = torch.ones(4, 8)
    with cost.ByteCounter() as counter:
        y = x * 2  # writes 4 x 8 float32: 128 bytes
        flat = y.view(32)  # a view: writes nothing
        flat[:16].sum()  # the slice is a view; the sum writes one float32
        y.add_(1)  # in place: writes y again
    assert counter.bytes == 128 + 4 + 128
    assert counter.ops == 5


def test_input_size_cost_counts_each_run_as_its_roialign_twin(capsys, restore_gpu_stand_ins):
    cost = load("input_size_cost")
    assert cost.cost_twin("r50_c4_roipool") == cost.cost_twin("r50_c4_roiwarp_max") == "r50_c4"
    assert cost.cost_twin("r50_c5_roipool") == "r50_c5_roialign"
    assert cost.cost_twin("r50_fpn_mlp2") == "r50_fpn_mlp2" and cost.cost_twin("r50_c4_softmax") == "r50_c4_softmax"
    result = cost.main(["--runs", "r50_c4", "r50_c4_roipool", "r50_fpn", "--batch", "1", "--sizes", "96", "192"])
    costs, total = result["costs"], result["total"]
    assert set(costs) == {"r50_c4", "r50_fpn"}  # RoIPool costs what RoIAlign does
    for size in (96, 192):
        assert total[size][0] == pytest.approx(2 * costs["r50_c4"][size][0] + costs["r50_fpn"][size][0])
    for run in costs:  # a larger input: more arithmetic and more bytes
        assert costs[run][192][0] > costs[run][96][0] > 0 and costs[run][192][1] > costs[run][96][1] > 0
    assert "table (3 runs)" in capsys.readouterr().out


def test_train_infer_benchmark_runs_both_models_with_the_same_weights(capsys):
    pytest.importorskip("torchvision")
    assert load("train_infer").main(["--quick", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(ours|torchvision)\s+[\d.]+\s+(\d+)", out, flags=re.M))
    assert rows == {"ours": "100", "torchvision": "100"}  # 100 detections with masks each
    assert "ratio ours / torchvision: inference" in out


def test_train_infer_profiles_both_models_only_after_both_are_timed(monkeypatch):
    """torchvision, the reference, was timed after ours had been profiled in the same process:
    a profiler session slows what follows it (pytorch/pytorch#144455; run 2 on the H200)."""
    pytest.importorskip("torchvision")
    train_infer = load("train_infer")
    events, real_timed = [], train_infer.timed
    monkeypatch.setattr(train_infer, "timed", lambda fn, *a, **k: (events.append(f"timed {fn.__name__}"),
                                                                  real_timed(fn, *a, **k))[1])
    monkeypatch.setattr(train_infer, "profile_steps", lambda step, device, steps, name: events.append(f"profile {name}"))
    assert train_infer.main(["--quick", "--iters", "1", "--profile", "1"]) == 0
    assert events == ["timed infer", "timed train_step"] * 2 + ["profile ours", "profile torchvision"]



def test_mini_step_times_each_run_it_is_given(capsys):
    assert load("mini_step").main(["--quick", "--runs", "r50_c4,r50_fpn_mlp2"]) == 0
    out = capsys.readouterr().out
    assert "2 images of 64 px, model input 64 px" in out
    rows = [line.split()[0] for line in out.splitlines() if "ms/step" in line]
    assert rows == ["r50_c4", "r50_fpn_mlp2"]
    with pytest.raises(SystemExit):
        load("mini_step").main(["--quick", "--runs", "r50_c3"])


def test_mini_step_prices_the_whole_schedule_at_each_batch_size(capsys, tmp_path):
    # quick turns "16,64" into 2 and 4 images: the schedule's 3000 x 16 images are 24000 steps
    # of 2 or 12000 of 4, and the second size is compared with the first in the same run
    path = tmp_path / "mini_step.json"
    assert load("mini_step").main(["--quick", "--runs", "r50_c4", "--images", "16,64", "--json", str(path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "ms/step" in line]
    assert len(rows) == 2 and "24000 steps of 2" in rows[0] and "12000 steps of 4" in rows[1]
    timings = json.loads(path.read_text())["runs"]["r50_c4"]
    for n, steps in (("2", 24000), ("4", 12000)):
        assert timings[n]["schedule_s"] == pytest.approx(timings[n]["ms_per_step"] * steps / 1000, rel=1e-3, abs=0.1)
    assert "x the time with 2" in rows[1] and "the time with" not in rows[0]
    assert timings["2"]["peak_mib"] is None  # GPU memory only; a CPU has no allocator statistics
    assert "channels_last_ms_per_step" not in timings["2"]
    assert json.loads(path.read_text())["device_mib"] is None
    with pytest.raises(SystemExit):
        load("mini_step").main(["--quick", "--images", "16,x"])


def test_live_tensors_counts_storage_bytes_as_the_allocator_holds_them():
    LiveTensors = load("step_memory").LiveTensors
    with LiveTensors() as live:
        x = torch.ones(250_000, requires_grad=True)  # 1 MB of float32
        y = x.exp().sum()  # exp's output is saved for the backward pass: alive without a name
        view = x.detach().view(500, 500)  # a view: no new storage
        assert live.bytes == 2_000_000 + 4
        y.backward()  # x.grad (1 MB) is made while exp's output is still held, and y's grad (1.0)
        assert live.peak == 3_000_000 + 4 + 4
        del y  # the graph and its saved output go with it
        assert live.bytes == 2_000_000  # x and x.grad
        del view
        assert live.bytes == 2_000_000  # the view held no storage of its own
    assert live.peak == 3_000_008


def test_step_memory_measures_each_size_in_its_own_process(capsys, tmp_path):
    path = tmp_path / "step_memory.json"
    assert load("step_memory").main(["--runs", "r50_c4", "--images", "3,1", "--size", "64", "--input-size", "64",
                                     "--json", str(path)]) == 0
    measured = json.loads(path.read_text())
    assert measured["images"] == [1, 3] and measured["amp"] == "none"  # fp32 on the CPU
    peaks = {int(n): mib for n, mib in measured["runs"]["r50_c4"]["peak_mib"].items()}
    assert set(peaks) == {1, 3} and peaks[3] > peaks[1] > 0  # more images, more activations
    assert measured["runs"]["r50_c4"]["mib_per_image"] == pytest.approx((peaks[3] - peaks[1]) / 2, abs=0.06)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("r50_c4"))
    assert row.split()[1:3] == [f"{peaks[1]:.0f}", f"{peaks[3]:.0f}"] and row.endswith("GiB")
    with pytest.raises(SystemExit):
        load("step_memory").main(["--runs", "r50_c3"])


def test_mini_step_times_channels_last_beside_nchw(capsys, tmp_path):
    path = tmp_path / "mini_step.json"
    assert load("mini_step").main(["--quick", "--runs", "r50_c4", "--channels-last", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    timing = json.loads(path.read_text())["runs"]["r50_c4"]["2"]
    line = re.search(r"r50_c4 +2 images, channels last: +([\d.]+) ms, ([\d.]+)x the time of NCHW", out)
    assert float(line[1]) == pytest.approx(timing["channels_last_ms_per_step"], abs=0.06)
    assert float(line[2]) == pytest.approx(timing["channels_last_ms_per_step"] / timing["ms_per_step"], abs=0.011)


def test_mini_step_runs_size_major_and_leaves_out_a_size_that_runs_out_of_memory(capsys, tmp_path, monkeypatch):
    mini_step = load("mini_step")
    real_step_fn = mini_step.step_fn

    def step_fn(run, images, *args, **kwargs):  # r50_c4 at 4 images: as if the GPU were full
        if run == "r50_c4" and len(images) == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_step_fn(run, images, *args, **kwargs)

    monkeypatch.setattr(mini_step, "step_fn", step_fn)
    path = tmp_path / "mini_step.json"
    assert mini_step.main(["--quick", "--runs", "r50_c4,r50_fpn", "--images", "16,64", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    timed_rows = [tuple(line.split()[:2]) for line in out.splitlines() if "ms/step" in line]
    assert timed_rows == [("r50_c4", "2"), ("r50_fpn", "2"), ("r50_fpn", "4")]  # every run's small size first
    assert re.search(r"r50_c4 +4 images: out of GPU memory", out)
    runs = json.loads(path.read_text())["runs"]
    assert set(runs["r50_c4"]) == {"2"} and set(runs["r50_fpn"]) == {"2", "4"}
    assert not list(tmp_path.glob("*.tmp"))  # written aside, then moved over
    # pick_batch compares the sizes every run has: the OOM size is not among them
    assert load("pick_batch").pick_batch(path, None, max_batch=64) == 2


def test_mini_step_profiles_after_every_timing_and_survives_an_nhwc_out_of_memory(capsys, tmp_path, monkeypatch):
    """A profiler session slows what is timed after it in the process (CUPTI's callbacks stay,
    pytorch/pytorch#144455): the profile ran right after each NCHW timing, before the NHWC one and
    the larger sizes. And an out-of-memory in the NHWC variant ended the script (review findings)."""
    mini_step = load("mini_step")
    events, real_step_fn, real_timed = [], mini_step.step_fn, mini_step.timed

    def step_fn(run, images, *args, **kwargs):
        if len(args) == 5 and args[4] and len(images) == 4:  # channels last at 4 images: the GPU is full
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_step_fn(run, images, *args, **kwargs)

    monkeypatch.setattr(mini_step, "step_fn", step_fn)
    monkeypatch.setattr(mini_step, "timed", lambda *a, **k: (events.append("timed"), real_timed(*a, **k))[1])
    monkeypatch.setattr(mini_step, "profile_steps", lambda step, device, steps, name: events.append(f"profile {name}"))
    path = tmp_path / "mini_step.json"
    assert mini_step.main(["--quick", "--runs", "r50_c4", "--images", "64,16", "--channels-last", "--profile", "1",
                           "--json", str(path)]) == 0
    assert events == ["timed"] * 3 + ["profile r50_c4, 2 images", "profile r50_c4, 4 images"]
    assert re.search(r"r50_c4 +4 images, channels last: out of GPU memory", capsys.readouterr().out)
    runs = json.loads(path.read_text())["runs"]["r50_c4"]
    assert "channels_last_ms_per_step" in runs["2"] and "channels_last_ms_per_step" not in runs["4"]
    assert set(runs) == {"2", "4"}  # --images 64,16 is timed small first: sorted


def test_mini_step_skips_channels_last_where_group_norm_would_undo_it(capsys, tmp_path, monkeypatch):
    mini_step = load("mini_step")
    assert mini_step.group_norm_keeps_channels_last(torch.device("cpu"))  # the CPU's GroupNorm keeps NHWC
    monkeypatch.setattr(mini_step, "group_norm_keeps_channels_last", lambda device: False)  # CUDA before 2026
    path = tmp_path / "mini_step.json"
    assert mini_step.main(["--quick", "--runs", "r50_c4", "--channels-last", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "channels last: not timed" in out and "x the time of NCHW" not in out
    measured = json.loads(path.read_text())
    assert measured["group_norm_keeps_channels_last"] is False
    assert "channels_last_ms_per_step" not in measured["runs"]["r50_c4"]["2"]
    assert measured["runs"]["r50_c4"]["2"]["syncs_per_step"] is None  # counted on CUDA only
    assert load("pick_batch").pick_channels_last(path, None, 2) is False


def test_host_copies_counts_each_host_built_tensor_of_a_training_step_by_call_site(capsys):
    host_copies = load("host_copies")
    c4, fpn = host_copies.count_host_copies("r50_c4"), host_copies.count_host_copies("r50_fpn")
    # pad_rows: the RPN's gt boxes, the box head's gt boxes, gt labels and candidates; preprocess:
    # the pixel mean and std; batch_mask_targets: the mask offsets and bounds of its one run of
    # same-size images; boxes_to_rois: one per RoIPooler call, the box head's, and FPN's mask head's;
    # clip_boxes: the image sizes the RPN's proposals are clipped to
    common = {"pad_rows": 4, "preprocess": 2, "sample_rois_padded": 1, "batch_mask_targets": 2, "clip_boxes": 1}
    assert c4 == {**common, "boxes_to_rois": 1}
    assert fpn == {**common, "boxes_to_rois": 2}
    assert all(sys.modules[name].host_to_device is host_copies.mrcnn_edu.device.host_to_device
               for name in host_copies.CALLERS)  # put back
    assert host_copies.main(["--runs", "r50_c4"]) == 0
    assert "r50_c4: 11 host-to-device copies per training step" in capsys.readouterr().out


def test_profile_counts_each_kernel_once():
    from torch.autograd import DeviceType
    device_events = load("train_infer").device_events

    class Event:
        def __init__(self, key, device_type, self_device_time_total):
            self.key, self.device_type, self.self_device_time_total = key, device_type, self_device_time_total

    # an op that launched one 10 µs kernel: the op's self GPU time is that kernel's
    events = [Event("aten::mul", DeviceType.CPU, 10.0), Event("elementwise_kernel", DeviceType.CUDA, 10.0),
              Event("aten::empty", DeviceType.CPU, 0.0)]
    assert [e.key for e in device_events(events)] == ["elementwise_kernel"]
    assert sum(e.self_device_time_total for e in device_events(events)) == 10.0


def test_pick_batch_keeps_the_committed_size_else_takes_the_cheapest_schedule(tmp_path):
    pick = load("pick_batch").pick_batch
    timed = tmp_path / "mini_step.json"  # as mini_step.py --json writes it (made-up seconds)
    timed.write_text(json.dumps({"runs": {
        "r50_c4": {"16": {"schedule_s": 600.0}, "32": {"schedule_s": 330.0}, "64": {"schedule_s": 250.0}},
        "r50_fpn": {"16": {"schedule_s": 700.0}, "32": {"schedule_s": 380.0}, "64": {"schedule_s": 500.0}}}}))
    assert pick(timed, None) == 32  # 710 s in all against 750 s at 64 and 1300 s at 16
    # the smallest batch within 1.2x of the cheapest: 64 saves too little over 32 to cost AP
    timed_64 = tmp_path / "mini_step_64.json"
    timed_64.write_text(json.dumps({"runs": {"r50_c4": {"16": {"schedule_s": 900.0}, "32": {"schedule_s": 590.0},
                                                        "64": {"schedule_s": 500.0}}}}))
    assert pick(timed_64, None) == 32 and pick(timed_64, None, tolerance=1.1, max_batch=64) == 64
    # not above 32 unless asked: 125 steps of 64 trained C4 to a quarter of 500 steps of 16's AP
    assert pick(timed_64, None, tolerance=1.1) == 32
    assert pick(None, None) is None and pick(tmp_path / "missing.json", tmp_path / "missing.json") is None
    results = tmp_path / "table2_miniature.json"
    def trained(*sizes):  # a results JSON with one record per batch size, as ablate writes it
        seeds = {str(i): {"train_config": {"images_per_batch": n}} for i, n in enumerate(sizes)}
        return json.dumps({"runs": {"r50_c4": {"seeds": seeds}, "r50_fpn": {"seeds": {}}}})

    results.write_text(trained())  # nothing trained yet: the timings decide
    assert pick(timed, results) == 32
    results.write_text(trained(16, 16))
    assert pick(timed, results) == 16  # a table started at 16 goes on at 16
    results.write_text(trained(16, 64))
    with pytest.raises(ValueError, match=r"mixes images_per_batch \[16, 64\]"):
        pick(timed, results)
    # a first lease that finished nothing but left trainings (carried in .carry/): the next one,
    # with no mini_step timings, must train at their size, or it could not resume them
    lease1 = {"runs": {"r50_c4": {"seeds": {}}}, "sessions": [
        {"left": [["r50_c4", 0]], "images_per_batch": 32, "channels_last": False}]}
    results.write_text(json.dumps(lease1))
    assert pick(None, results) == 32
    assert load("pick_batch").pick_channels_last(None, results, 32) is False
    lease1["sessions"].append({"left": [], "images_per_batch": 16})  # a session that left nothing: no say
    results.write_text(json.dumps(lease1))
    assert pick(None, results) == 32


def test_pick_batch_takes_no_size_whose_trainings_do_not_fit_together(tmp_path, capsys):
    pick_batch = load("pick_batch")
    timed = tmp_path / "mini_step.json"

    def write(device_mib, peaks):  # as mini_step.py --json writes it on a GPU (made-up numbers)
        seconds = {16: 900.0, 32: 500.0, 64: 300.0}
        timed.write_text(json.dumps({"device_mib": device_mib, "runs": {
            "r50_c4": {str(n): {"schedule_s": seconds[n], "peak_mib": peaks[n]} for n in seconds},
            "r50_fpn": {str(n): {"schedule_s": seconds[n], "peak_mib": peaks[n] and peaks[n] / 2}
                        for n in seconds}}}))

    write(140_000, {16: 2000.0, 32: 4000.0, 64: 8000.0})
    assert pick_batch.pick_batch(timed, None, jobs=8, max_batch=64) == 64  # 8 x 8000 x 1.15 = 73,600 MiB fit
    # 8 x 16,000 x 1.15 = 147,200 MiB > 0.85 x 140,000: 64 is out, and 32 (the cheapest left) is in
    write(140_000, {16: 4000.0, 32: 8000.0, 64: 16000.0})
    assert pick_batch.pick_batch(timed, None, jobs=8, max_batch=64) == 32
    assert pick_batch.pick_batch(timed, None, jobs=4, max_batch=64) == 64  # four of them fit
    assert pick_batch.fits([{64: {"peak_mib": 16000.0}}], 64, 140_000, 6)  # 110,400 <= 119,000
    assert not pick_batch.fits([{64: {"peak_mib": 16000.0}}], 64, 140_000, 7)  # 128,800
    write(10_000, {16: 4000.0, 32: 8000.0, 64: 16000.0})  # nothing fits: the smallest, said aloud
    assert pick_batch.pick_batch(timed, None, jobs=8, max_batch=64) == 16
    assert "do not fit in 10000 MiB at any timed size" in capsys.readouterr().err
    write(None, {16: None, 32: None, 64: None})  # CPU timings carry no peaks: time alone decides
    assert pick_batch.pick_batch(timed, None, jobs=8, max_batch=64) == 64
    assert pick_batch.pick_batch(timed, None, jobs=8) == 32  # the default cap


def test_pick_channels_last_keeps_the_committed_layout_else_takes_the_faster(tmp_path):
    pick = load("pick_batch").pick_channels_last
    timed = tmp_path / "mini_step.json"  # as mini_step.py --channels-last --json writes it (made up)
    timed.write_text(json.dumps({"runs": {
        "r50_c4": {"16": {"ms_per_step": 100.0, "channels_last_ms_per_step": 80.0},
                   "64": {"ms_per_step": 300.0, "channels_last_ms_per_step": 290.0}},
        "r50_fpn": {"16": {"ms_per_step": 100.0, "channels_last_ms_per_step": 105.0},
                    "64": {"ms_per_step": 300.0}}}}))
    assert pick(timed, None, 16)  # 185 ms against 200: more than 5 % faster
    assert not pick(timed, None, 64)  # r50_fpn was not timed in NHWC at 64: no evidence
    assert not pick(timed, None, 32) and not pick(None, None, 16)
    results = tmp_path / "table2_miniature.json"
    def trained(*layouts):  # records as ablate writes them; None: a record from before the option
        seeds = {str(i): {"train_config": {} if cl is None else {"channels_last": cl}} for i, cl in enumerate(layouts)}
        return json.dumps({"runs": {"r50_c4": {"seeds": seeds}}})

    results.write_text(trained(None, False))
    assert not pick(timed, results, 16)  # the committed NCHW table stays NCHW
    results.write_text(trained(True))
    assert pick(timed, results, 64)
    results.write_text(trained(True, None))
    with pytest.raises(ValueError, match=r"mixes channels_last \[False, True\]"):
        pick(timed, results, 16)
    assert load("pick_batch").main(["--mini-step", str(timed), "--channels-last-at", "16"]) == 0


def test_pick_channels_last_takes_nhwc_only_where_its_own_peaks_fit(tmp_path, capsys):
    """pick_batch checked NCHW's peaks; NHWC was then taken by its speed alone, though its
    trainings can hold more (a review finding: mini_step did not even record NHWC's peak)."""
    pick_batch = load("pick_batch")
    timed = tmp_path / "mini_step.json"

    def write(nhwc_peak):
        timed.write_text(json.dumps({"device_mib": 100_000, "runs": {
            "r50_c4": {"16": {"ms_per_step": 100.0, "peak_mib": 8000.0, "channels_last_ms_per_step": 80.0,
                              "channels_last_peak_mib": nhwc_peak}}}}))

    write(8000.0)  # 8 x 8000 x 1.15 = 73,600 MiB: fits
    assert pick_batch.pick_channels_last(timed, None, 16, jobs=8)
    write(12000.0)  # 8 x 12000 x 1.15 = 110,400 MiB: not on 100,000 MiB, though faster
    assert not pick_batch.pick_channels_last(timed, None, 16, jobs=8)
    assert pick_batch.pick_channels_last(timed, None, 16, jobs=4)
    assert pick_batch.main(["--mini-step", str(timed), "--jobs", "8", "--channels-last-at", "16"]) == 0
    assert capsys.readouterr().out.strip() == "no"


def test_host_reads_per_image_stay_few_whatever_the_number_of_detections(as_on_a_gpu):
    # On a GPU each host read is a synchronisation. Ours must not grow with the detections
    # (masks are pasted all at once; torchvision reads the host per detection, ~1300 times
    # per image with 100 masks -- bench/dispatch_counts.py prints both).
    from mrcnn_edu.config import mini_fpn
    from mrcnn_edu.model import MaskRCNN

    torch.manual_seed(0)
    cfg = mini_fpn(num_classes=3, image_size=64)
    cfg.box_head.score_thresh = 0.0  # random weights: keep 100 detections per image
    model = MaskRCNN(cfg)
    reads = {}
    for batch in (1, 3):
        images, targets = as_on_a_gpu.synthetic_batch(batch, 64, torch.Generator().manual_seed(0))
        for t in targets:
            t["labels"] = t["labels"].clamp(max=3)
        model.eval()
        with torch.no_grad():
            detections = model(images)
        assert all(len(d["boxes"]) == 100 for d in detections)
        reads[batch] = (as_on_a_gpu.count(model, images, targets, True)[1],
                        as_on_a_gpu.count(model, images, None, False)[1])
    train_per_image = (reads[3][0] - reads[1][0]) / 2
    infer_per_image = (reads[3][1] - reads[1][1]) / 2
    # NMS is counted as on a GPU (reads every 4 rounds). Training builds its targets and runs
    # the RPN's NMS for all images at once: measured 1.5 (15 reads for 1 image, 18 for 3; it
    # was 12 per image when each image was sampled alone). Inference runs the box head's NMS
    # image by image: measured 6, with 100 detections per image.
    assert train_per_image <= 3, reads
    assert infer_per_image <= 7, reads


def test_miniature_probe_checkpoint_every_lets_a_killed_probe_resume_to_the_same_model(tiny_shapes, tmp_path,
                                                                                       capsys):
    # a probe killed between its --eval-at checkpoints restarts from the last --checkpoint-every one
    probe = load("miniature_probe")
    common = ["--run", "r50_c4", "--quick", "--data", str(tiny_shapes["root"]), "--warmup", "1",
              "--iters", "2", "--no-eval", "--checkpoint-every", "1"]
    whole = probe.main(common + ["--out", str(tmp_path / "whole")])
    assert whole["eval"] == {}
    assert (tmp_path / "whole/model_0000001.pth").is_file() and (tmp_path / "whole/model_0000002.pth").is_file()
    # "killed" after iteration 1: keep only its checkpoint, then rerun the same command
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "whole/model_0000001.pth", killed)
    (killed / "last_checkpoint").write_text("model_0000001.pth")
    capsys.readouterr()
    probe.main(common + ["--out", str(killed)])
    assert "training iterations 1..2 " in capsys.readouterr().out  # resumed, not retrained from 0
    first = torch.load(tmp_path / "whole/model_0000002.pth", map_location="cpu", weights_only=False)["model"]
    again = torch.load(killed / "model_0000002.pth", map_location="cpu", weights_only=False)["model"]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(SystemExit):  # 3 does not divide --eval-at 2: no checkpoint to evaluate
        probe.main(common[:-1] + ["3", "--out", str(tmp_path / "bad")])


def test_miniature_probe_evaluates_on_the_way_what_a_shorter_run_gives(tiny_shapes, tmp_path, capsys,
                                                                        monkeypatch):
    # docs/training.md's 500-iteration rows are the 1000-iteration probes' checkpoints at 500:
    # with no lr decay, that must be exactly the model a 500-iteration probe ends with
    from mrcnn_edu.backbone import ResNet, mini_resnet

    probe = load("miniature_probe")
    evaluated = []  # the weights each evaluation saw: each --eval-at its own checkpoint

    def evaluate_model(model, *args):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate_model(model, *args)

    real_evaluate_model = probe.evaluate_model
    monkeypatch.setattr(probe, "evaluate_model", evaluate_model)
    weights = tmp_path / "ResNet-50.pth"
    torch.save({"model": ResNet(mini_resnet(width=8, num_classes=8)).state_dict(), "info": {"top1": 0.5}},
               weights)
    common = ["--run", "r50_c4", "--quick", "--data", str(tiny_shapes["root"]), "--warmup", "1",
              "--val-images", "4", "--weights", str(weights)]
    long = probe.main(common + ["--iters", "2", "--eval-at", "1", "2", "--diagnose", "3",
                                "--out", str(tmp_path / "long")])
    short = probe.main(common + ["--iters", "1", "--out", str(tmp_path / "short")])
    assert sorted(long["eval"]) == [1, 2] and sorted(short["eval"]) == [1]
    assert json.dumps(long["eval"][1]) == json.dumps(short["eval"][1])  # NaN-safe (no large objects)
    one = torch.load(tmp_path / "long/model_0000001.pth", map_location="cpu", weights_only=False)["model"]
    end = torch.load(tmp_path / "short/model_0000001.pth", map_location="cpu", weights_only=False)["model"]
    assert one.keys() == end.keys() and all(torch.equal(one[k], end[k]) for k in one)
    two_state = torch.load(tmp_path / "long/model_0000002.pth", map_location="cpu", weights_only=False)
    two, two_lr = two_state["model"], two_state["optimizer"]["param_groups"][0]["lr"]
    assert len(evaluated) == 3  # long at 1 and 2, short at 1
    for seen, checkpoint in zip(evaluated, (one, two, end)):
        assert all(torch.equal(seen[k], checkpoint[k]) for k in checkpoint)
    assert not all(torch.equal(one[k], two[k]) for k in one)  # one more step changed the weights
    assert long["init"]["top1"] == 0.5 and long["init"]["tensors"] > 0
    assert long["schedule"]["steps"] == (10**9,) and long["schedule"]["images_per_batch"] == 4
    diag = long["diagnose"]
    assert diag["images"] == 3 and diag["objects"] > 0
    assert 0 <= diag["rpn_recall@0.5"] <= 1 and 0 <= diag["class_right"] <= 1
    assert 0 <= diag["class_right_best_iou"] <= 1 and 0 <= diag["detected@0.5"] <= diag["objects"]
    assert diag["class_right_by_size"]["all"] == diag["class_right"]
    confusion = diag["class_confusion"]  # every found object once, under its true class
    assert sum(sum(row.values()) for row in confusion.values()) == diag["detected@0.5"]
    right = sum(row.get(truth, 0) for truth, row in confusion.items())
    assert diag["class_right"] == pytest.approx(right / max(diag["detected@0.5"], 1), abs=5e-4)
    assert 0 <= diag["mask_iou_given_box"]["all"] <= 1  # a 2-iteration model: any IoU is possible
    assert 0.5 < diag["mask_iou_ceiling"]["all"] <= 1  # 14 x 14 targets of the tiny set's 16-45 px shapes
    by_class = diag["mask_iou_ceiling_by_class"]
    assert set(by_class) <= set(SHAPE_NAMES) and by_class and all(0 < v <= 1 for v in by_class.values())
    assert set(diag["mask_iou_given_box_by_class"]) == set(by_class)
    templates = diag["mask_template_by_class"]
    assert set(templates) == set(by_class) and all(
        0 <= row[k] <= 1 for row in templates.values() for k in ("own", "template", "template_vs_own", "empty"))
    again = probe.main(common + ["--iters", "2", "--no-eval", "--diagnose", "3", "--out", str(tmp_path / "long")])
    assert again["eval"] == {} and again["diagnose"] == diag  # the finished run's last model, not retrained
    assert diag["split"] == "val"
    # the same model read on training images: the objects counted are the train file's
    on_train = probe.main(common + ["--iters", "2", "--no-eval", "--diagnose", "3", "--diagnose-split", "train",
                                    "--out", str(tmp_path / "long")])["diagnose"]
    train_coco = COCO(str(tiny_shapes["train"]))
    first = COCODataset(str(tiny_shapes["root"] / "train"), str(tiny_shapes["train"]), train=False).ids[:3]
    assert on_train["split"] == "train" and on_train["images"] == 3
    assert on_train["objects"] == len(train_coco.getAnnIds(imgIds=first, iscrowd=False))
    # a branch: the long run's first step continued with the lr divided by 10 from there on
    branch = probe.main(common + ["--iters", "2", "--decay-at", "1", "--no-eval", "--out", str(tmp_path / "branch"),
                                  "--start-from", str(tmp_path / "long/model_0000001.pth")])
    assert branch["schedule"]["steps"] == (1,)
    assert sorted(p.name for p in (tmp_path / "branch").glob("model_*.pth")) == ["model_0000002.pth"]
    decayed = torch.load(tmp_path / "branch/model_0000002.pth", map_location="cpu", weights_only=False)
    assert decayed["optimizer"]["param_groups"][0]["lr"] == pytest.approx(two_lr / 10)
    assert not all(torch.equal(decayed["model"][k], two[k]) for k in two)  # a smaller step than long's
    printed = capsys.readouterr().out
    assert "PROBE r50_c4 iteration 2: box AP" in printed and printed.count("RESULT ") == 5
    with pytest.raises(SystemExit):
        probe.main(common + ["--iters", "2", "--eval-at", "3"])
    assert "--eval-at: iterations must lie in 1..2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.main(common + ["--start-from", str(tmp_path / "nowhere.pth"), "--out", str(tmp_path / "x")])
    assert f"--start-from: no checkpoint file {tmp_path / 'nowhere.pth'}" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["mini_c4", "mini_fpn"])
def test_mask_given_box_measures_the_mask_branch_against_brute_force_counts(preset):
    # A mask branch that says "all of the box" (zero weights, bias +30) predicts exactly the box's
    # pixels, so its IoU with a disk inside the box is disk pixels / box pixels, counted by hand.
    # The ceiling: a box-filling object's m x m target is all ones, pasted back exactly its box.
    from mrcnn_edu.config import get_preset
    from mrcnn_edu.model import MaskRCNN

    probe = load("miniature_probe")
    model = MaskRCNN(get_preset(preset, num_classes=3, image_size=64, width=8)).eval()
    torch.nn.init.zeros_(model.mask_head.predictor.weight)
    torch.nn.init.constant_(model.mask_head.predictor.bias, 30.0)
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    disk = ((xx - 30) ** 2 + (yy - 30) ** 2 <= 10**2).to(torch.uint8)  # inside the box 20..40
    square = torch.zeros(64, 64, dtype=torch.uint8)
    square[8:16, 44:60] = 1  # rows 8..15, columns 44..59: fills the box (44, 8, 60, 16)
    target = {"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0], [44.0, 8.0, 60.0, 16.0]]),
              "labels": torch.tensor([1, 2]), "masks": torch.stack([disk, square])}
    cells = []
    rows = probe.mask_given_box(model, torch.rand(3, 64, 64), target, cells=cells)
    assert rows.shape == (2, 4) and rows[:, 3].tolist() == [1.0, 2.0]  # the labels ride along
    m = model.cfg.mask_head.resolution
    (predicted, target_cells), = cells  # the m x m grids: "all of the box", and the square fills its box
    assert predicted.shape == target_cells.shape == (2, m, m) and bool(predicted.all())
    assert bool(target_cells[1].all()) and 0 < target_cells[0].sum() < m * m
    assert rows[:, 0].tolist() == [float(disk.sum()), 128.0]
    assert rows[0, 1].item() == pytest.approx(float(disk.sum()) / 400)
    assert rows[1, 1].item() == pytest.approx(1.0) and rows[1, 2].item() == pytest.approx(1.0)
    if model.cfg.mask_head.resolution == 14:  # C4: 14 cells for the disk's 20 px lose detail
        assert 0.9 < rows[0, 2].item() < 1.0
    else:  # FPN: 28 cells for 20 px, finer than the pixels: the disk comes back exactly
        assert model.cfg.mask_head.resolution == 28 and rows[0, 2].item() == 1.0
    rows = torch.tensor([[100.0, 0.5, 1.0, 2], [2000.0, 0.7, 0.9, 1], [9300.0, 0.9, 1.0, 2]])
    assert probe._by_size(rows, 1) == {"all": 0.7, "small": 0.5, "medium": 0.7, "large": 0.9}
    assert probe._by_class(rows, 1, ["__background__", "a", "b", "c"]) == {"a": 0.7, "b": 0.7}
    assert probe._by_class(rows, 2, ["__background__", "a", "b", "c"]) == {"a": 0.9, "b": 1.0}


def test_class_templates_tells_a_head_that_draws_the_class_average_from_one_that_reads_the_object():
    # 2 x 2 grids. Class a: targets "top row" and "left column"; their mean (1, .5 / .5, 0) >= 0.5
    # is the template "all but the bottom right", and both predictions draw it: template IoU 1,
    # own IoU 2/3 each, as the template's own with each target. Class b: one target (its own
    # template), predicted empty.
    probe = load("miniature_probe")
    top, left = torch.tensor([[1, 1], [0, 0]]), torch.tensor([[1, 0], [1, 0]])
    corner, template, empty = torch.tensor([[0, 0], [0, 1]]), torch.tensor([[1, 1], [1, 0]]), torch.zeros(2, 2)
    cells = [(torch.stack([template, empty]).bool(), torch.stack([top, corner]).bool()),  # image 1: a, b
             (template[None].bool(), left[None].bool())]  # image 2: a
    result = probe.class_templates(cells, torch.tensor([1, 2, 1]), ["__background__", "a", "b"])
    assert result == {"a": {"objects": 2, "own": 0.667, "template": 1.0, "template_vs_own": 0.667, "empty": 0.0},
                      "b": {"objects": 1, "own": 0.0, "template": 0.0, "template_vs_own": 1.0, "empty": 1.0}}


def test_diagnose_reads_a_softmax_head_every_way_and_leaves_its_readout_as_it_was():
    # A softmax mask head that gives every pixel of every RoI the probabilities
    # softmax(0, 0, 2, 0) = (bg .096, class 1 .096, class 2 .711, class 3 .096): class 2 takes the
    # foreground mass whatever the object. The class-1 disk then gets no pixel by p_1 >= 0.5 or by
    # argmax (IoU 0), but its whole box by 1 - p_bg (IoU = disk / box pixels, counted); the class-2
    # square, which fills its box, gets its box every way (IoU 1).
    from mrcnn_edu.config import get_preset
    from mrcnn_edu.model import MaskRCNN

    probe = load("miniature_probe")
    cfg = get_preset("mini_fpn", num_classes=3, image_size=64, width=8)
    cfg.mask_head = dataclasses.replace(cfg.mask_head, loss="softmax")
    model = MaskRCNN(cfg).eval()
    torch.nn.init.zeros_(model.mask_head.predictor.weight)
    with torch.no_grad():
        model.mask_head.predictor.bias.copy_(torch.tensor([0.0, 0.0, 2.0, 0.0]))
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    disk = ((xx - 30) ** 2 + (yy - 30) ** 2 <= 10**2).to(torch.uint8)  # inside the box 20..40
    square = torch.zeros(64, 64, dtype=torch.uint8)
    square[8:16, 44:60] = 1
    target = {"boxes": torch.tensor([[20.0, 20.0, 40.0, 40.0], [44.0, 8.0, 60.0, 16.0]]),
              "labels": torch.tensor([1, 2]), "masks": torch.stack([disk, square])}

    class OneImage:
        class_names = ["__background__", "a", "b", "c"]

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(index)), target

    result = probe.diagnose(model, OneImage(), 1)
    share = round(float(disk.sum()) / 400, 3)
    assert result["mask_iou_given_box_by_softmax_readout"] == {
        "probability": {"all": 0.5, "a": 0.0, "b": 1.0},
        "argmax": {"all": 0.5, "a": 0.0, "b": 1.0},
        "foreground": {"all": round((float(disk.sum()) / 400 + 1) / 2, 3), "a": share, "b": 1.0}}
    assert result["mask_iou_given_box_by_class"] == {"a": 0.0, "b": 1.0}  # the model's own readout
    assert model.cfg.mask_head.softmax_readout == "probability"


def test_class_of_found_names_an_object_by_its_highest_scoring_overlapping_detection():
    # Object 0 has three detections on it: the best-overlapping (IoU 1) is named 5 at score 0.2;
    # the highest-scoring at IoU >= 0.5 (IoU 0.8, score 0.9) is named 3; a score-0.99 box at
    # IoU 0.4 does not find it and does not count. Object 1 is found by nothing; object 2's only
    # detection is named 4.
    probe = load("miniature_probe")
    gt_boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0], [100.0, 0.0, 120.0, 20.0]])
    detections = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0],     # IoU 1 with object 0
                                         [0.0, 0.0, 20.0, 16.0],     # IoU 320/400 = 0.8
                                         [0.0, 0.0, 20.0, 8.0],      # IoU 160/400 = 0.4: a miss
                                         [100.0, 0.0, 120.0, 20.0]]),  # IoU 1 with object 2
                  "scores": torch.tensor([0.2, 0.9, 0.99, 0.7]),
                  "labels": torch.tensor([5, 3, 3, 4])}
    assert probe.class_of_found(gt_boxes, detections).tolist() == [[3, 5], [0, 0], [4, 4]]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    assert probe.class_of_found(gt_boxes, empty).tolist() == [[0, 0]] * 3


def test_roi_quantisation_measures_roipools_rounding_by_hand(tmp_path, capsys):
    quant = load("roi_quantisation")
    annotations = {
        "images": [{"id": 1, "width": 100, "height": 50}],
        "annotations": [
            # at 2x: [0, 0, 32, 32]; stride 16 -> cells 0..2 inclusive = [0, 48]: IoU 32²/48²
            {"id": 1, "image_id": 1, "bbox": [0, 0, 16, 16], "area": 200.0, "iscrowd": 0},
            # at 2x: x [16.4, 30] / 16 = [1.025, 1.875], rounded to cells 1..2 = [16, 48];
            # y [0, 80] / 16 = [0, 5]: cells 0..5 = [0, 96]
            {"id": 2, "image_id": 1, "bbox": [8.2, 0, 6.8, 40], "area": 2000.0, "iscrowd": 0},
            {"id": 3, "image_id": 1, "bbox": [0, 0, 50, 50], "area": 2500.0, "iscrowd": 1},
        ]}
    boxes, areas = quant.boxes_at_input_size(annotations, input_size=100, max_size=None)
    assert torch.allclose(boxes, torch.tensor([[0, 0, 32, 32], [16.4, 0, 30, 80]], dtype=torch.float64))
    assert areas.tolist() == [200.0, 2000.0]  # the crowd is skipped; areas stay the original's
    q = quant.quantised_boxes(boxes, 16)
    assert q.tolist() == [[0, 0, 48, 48], [16, 0, 48, 96]]
    iou_2 = (13.6 * 80) / (32 * 96)  # the true box lies inside its RoI
    records = {(r["stride"], r["group"]): r for r in quant.measure(boxes, areas, [16])}
    assert records[16, "small"]["boxes"] == 1 and records[16, "medium"]["boxes"] == 1
    assert records[16, "large"]["boxes"] == 0
    assert records[16, "small"]["iou_mean"] == pytest.approx(32**2 / 48**2)
    assert records[16, "medium"]["iou_mean"] == pytest.approx(iou_2)
    assert records[16, "all"]["iou_mean"] == pytest.approx((32**2 / 48**2 + iou_2) / 2)
    assert records[16, "small"]["edge_shift_px"] == pytest.approx((0 + 0 + 16 + 16) / 4)
    # the longer side's cap: 100 x 50 at shorter side 100 would be 200 wide; capped at 150 -> 1.5x
    capped, _ = quant.boxes_at_input_size(annotations, input_size=100, max_size=150)
    assert torch.allclose(capped[0], torch.tensor([0, 0, 24, 24], dtype=torch.float64))
    # a coarser stride moves the same boxes further
    coarse = {(r["stride"], r["group"]): r for r in quant.measure(boxes, areas, [16, 32])}
    assert coarse[32, "all"]["iou_mean"] < coarse[16, "all"]["iou_mean"]
    # the command line, and an annotation naming an image the file does not have
    path = tmp_path / "val.json"
    path.write_text(json.dumps(annotations))
    printed = quant.main(["--annotations", str(path), "--input-size", "100", "--strides", "16"])
    expected = quant.measure(boxes, areas, [16])
    assert json.dumps(printed) == json.dumps(expected)  # NaN-safe: no large box
    assert "2 boxes" in capsys.readouterr().out
    annotations["annotations"][0]["image_id"] = 7
    with pytest.raises(ValueError, match=r"val\.json: annotation 1 names image_id 7"):
        quant.boxes_at_input_size(annotations, 100, None, str(path))


def test_cpu_malloc_trains_twice_with_identical_losses(tiny_shapes, capsys):
    # the two trainings differ only in where glibc puts the bytes: the losses must be the same
    cpu_malloc = load("cpu_malloc")
    result = cpu_malloc.main(["--run", "r50_c5_roialign", "--quick", "--data", str(tiny_shapes["root"]),
                              "--iters", "2"])
    assert result["same_losses"] is True and result["records"] >= 1  # not two empty logs
    usage = result["usage"]
    assert set(usage) == {"glibc-default", "keep"}
    assert all(u["user_s"] > 0 and u["minor_faults"] > 0 for u in usage.values())
    assert "logged losses identical: True" in capsys.readouterr().out


def test_dispatch_counter_counts_indexing_by_a_boolean_mask_as_a_host_read():
    # x[mask] dispatches one aten.index whose result size is the mask's count: a sync on a GPU
    counter_module = load("dispatch_counts")
    x = torch.arange(6.0)
    with counter_module.DispatchCounter() as counter:
        x[x > 2]  # gt + index with a mask: one read
        x[torch.tensor([0, 2])]  # index by positions: its size is known, no read
        y = x.clone()
        y[y > 4] = 0.0  # index_put with a mask: one read
    assert counter.reads == {"index (boolean mask)": 1, "index_put_ (boolean mask)": 1}


def test_the_rpn_and_keypoint_losses_read_nothing_on_the_host():
    # both run every training step; a read each would stall the GPU's queue each step
    from mrcnn_edu.matching import BalancedSampler
    from mrcnn_edu.roi_heads.keypoint_head import keypoint_loss
    from mrcnn_edu.rpn import rpn_loss

    counter_module = load("dispatch_counts")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 2, (2, 500), generator=g).float()
    objectness = torch.randn(2, 500, generator=g, requires_grad=True)
    deltas = torch.randn(2, 500, 4, generator=g, requires_grad=True)
    logits = torch.randn(6, 5, 8, 8, generator=g, requires_grad=True)
    valid = torch.rand(6, 5, generator=g) > 0.5
    with counter_module.DispatchCounter() as counter:
        rpn = rpn_loss(objectness, deltas, labels, torch.randn(2, 500, 4, generator=g), BalancedSampler(256, 0.5), generator=g)
        kp = keypoint_loss(logits, torch.randint(0, 64, (6, 5), generator=g), valid)
        (sum(rpn.values()) + kp).backward()
    assert counter.ops > 20 and not counter.reads, counter.reads


def test_shapes_version_diff_finds_exactly_the_annotations_this_generator_writes_otherwise(tmp_path):
    import json

    from mrcnn_edu.data import shapes

    diff = load("shapes_version_diff")
    shapes.generate(str(tmp_path), preset="tiny", seed=4)
    assert diff.compare_split(tmp_path, "val")["images changed"] == 0  # this version: nothing differs
    path = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    person = next(a for a in data["annotations"] if a.get("keypoints"))
    person["keypoints"][2] = 3 - person["keypoints"][2]  # one visibility flipped (1 <-> 2)
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    crowd["area"] += 1.0
    path.write_text(json.dumps(data))
    counts = diff.compare_split(tmp_path, "val")
    assert counts["keypoint annotations"] == 1 and counts["crowd annotations"] == 1
    assert counts["images changed"] == len({person["image_id"], crowd["image_id"]})
    assert counts["images"] == len(data["images"]) and counts["version then"] == shapes.GENERATOR_VERSION



def test_roi_pool_windows_times_ours_against_torchvision_with_and_without_a_whole_image_roi(capsys):
    pytest.importorskip("torchvision")
    assert load("roi_pool_windows").main(["--rois", "6", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["6 RoIs, no whole-image RoI", "6 RoIs, one whole-image RoI"]
    assert all(re.search(r"ours / torchvision \d+\.\d$", line) for line in lines)


def test_worker_memory_measures_each_run_in_its_own_process(tmp_path, capsys):
    # a few MB of annotations: the figures are noise at this size; the script's path is what runs
    from bench.worker_memory import main

    results = main(["--out", str(tmp_path), "--objects-mb", "2", "--images", "20", "--workers", "1",
                    "--batches", "6", "--gc-every", "2", "--main-gc-every", "2", "--runs", "objects,buffer"])
    assert set(results) == {"objects", "buffer"}
    printed = capsys.readouterr().out
    assert "per-worker USS, mean" in printed and "reading the buffer" in printed


def test_cpu_probe_claims_judges_each_design_alone_and_gives_the_verdicts_the_docs_quote():
    """docs/training.md and notebook 09 quote these verdicts; C4 at 384 px and FPN at 192 px are
    different designs, so no claim may mix them (FPN beats C4 is 'not run' here)."""
    module = load("cpu_probe_claims")
    c4, fpn = module.verdicts(module.C4_384), module.verdicts(module.FPN_192)
    remade = module.verdicts(module.FPN_192_REMADE)
    assert not any("FPN beats C4" in line for line in c4 + fpn + remade)
    assert any(line.startswith("FCN beats the 3-fc MLP mask head (2e): ours +19.60 ± 1.26") and
               line.endswith(": agrees") for line in fpn)
    assert any(line.startswith("sigmoid beats softmax (2b): ours +8.32 ± 0.27") for line in c4)
    # R-101 is judged only against R-50 runs of one body (its seed 0 on the first body is not)
    assert not any(line.startswith("deeper") for line in fpn)
    deeper = "deeper: ResNet-101-FPN beats ResNet-50-FPN (2a): ours -2.40 ± 0.70 (df 3.8; seeds: r101_fpn 3, r50_fpn 3)"
    assert any(line.startswith(deeper) and line.endswith(": contradicts") for line in remade)
    resnext = "ResNeXt-101-FPN beats ResNet-101-FPN (2a): ours -0.23 ± nan (df nan; seeds: x101_fpn 1, r101_fpn 3)"
    assert any(line.startswith(resnext) and line.endswith("opposite direction (no spread: 1 seed)") for line in remade)
    assert any(line.startswith("RoIAlign is insensitive to max vs average pooling") and "undecided" in line
               for line in c4)
    # every run of a design has the same number of metrics per seed, in percent
    for values in (module.C4_384, module.FPN_192, module.FPN_192_REMADE):
        for seeds in values.values():
            assert all(set(seed) == {"APbb", "APbb50", "APbb75", "AP", "AP50", "AP75"} for seed in seeds)


def test_nms_bench_times_both_of_our_ways_against_torchvision_and_checks_they_agree(capsys):
    pytest.importorskip("torchvision")
    assert load("nms").main(["--sizes", "300", "--classes", "5", "--repeat", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["scattered", "5", "crowded", "5"]
    assert all(len(re.findall(r"\d+\.\d\d", row)) == 5 for row in rows)  # 3 times, 2 ratios
