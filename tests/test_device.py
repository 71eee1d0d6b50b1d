"""device.host_to_device, and the training step's host-built tensors reaching the GPU without a sync.

On the CPU host_to_device is ``tensor.to(device)``, checked by value. The CUDA tests (skipped
without a GPU) count the synchronising calls of each function that builds tensors on the host
with ``device.count_syncs`` (``torch.cuda.set_sync_debug_mode("warn")``: a warning per
synchronising call, a blocking host-to-device copy among them), and compare the results with the
CPU's.
"""
import pytest
import torch

from mrcnn_edu.boxes import pad_rows
from mrcnn_edu.data.transforms import normalize, size_ratios
from mrcnn_edu.device import count_syncs as syncs
from mrcnn_edu.device import host_to_device
from mrcnn_edu.ops import boxes_to_rois
from mrcnn_edu.roi_heads.mask_head import batch_mask_targets

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("tensor", [torch.arange(7), torch.tensor([[True, False], [True, True]]),
                                    torch.empty(0, 4), torch.linspace(0, 1, 5, dtype=torch.float64)])
def test_host_to_device_keeps_values_on_cpu(tensor):
    out = host_to_device(tensor, "cpu")
    assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)


def _host_built_cases(device):
    """Each function that builds a tensor on the host during a training step, on ``device``."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.rand(n, 4, generator=g).to(device) for n in (3, 0, 5)]
    boxes = [torch.rand(n, 4, generator=g).to(device) * 50 for n in (4, 2)]
    masks = [(torch.rand(n, 20, 24, generator=g) > 0.5).to(device) for n in (2, 3)]
    matched = [torch.tensor([0, 1, 1, 0]).to(device), torch.tensor([2, 0]).to(device)]
    image = torch.rand(3, 8, 8, generator=g).to(device)
    return {
        "pad_rows": lambda: pad_rows(rows, fill=-1),
        "boxes_to_rois": lambda: boxes_to_rois(boxes),
        "size_ratios": lambda: torch.stack(size_ratios((384, 512), (192, 256), device)),
        "normalize": lambda: normalize(image),
        "batch_mask_targets": lambda: batch_mask_targets(masks, matched, boxes, 14),
    }


@cuda
def test_host_to_device_on_cuda_is_queued_without_a_sync():
    host = torch.arange(1000).reshape(10, 100)
    plain, plain_syncs = syncs(lambda: host.to("cuda") * 2)
    queued, queued_syncs = syncs(lambda: host_to_device(host, "cuda") * 2)
    assert plain_syncs == 1  # the blocking copy, as the sync debug mode sees it: the test can see one
    assert queued_syncs == 0
    assert queued.is_cuda and torch.equal(queued.cpu(), host * 2) and torch.equal(plain, queued)


# batch_mask_targets checks its indices on the CPU only (mask_head._check_values); its RoIAlign
# (adaptive sampling) reads the RoIs' grid sizes once in the PyTorch path, not in the CuPy kernel
@cuda
@pytest.mark.parametrize("name", ["pad_rows", "boxes_to_rois", "size_ratios", "normalize", "batch_mask_targets"])
def test_host_built_tensors_reach_the_gpu_without_a_sync(name):
    from mrcnn_edu.ops.roi_align import cupy_available

    expected = 1 if name == "batch_mask_targets" and not cupy_available() else 0
    on_cpu = _host_built_cases("cpu")[name]()
    call = _host_built_cases("cuda")[name]
    call()  # the first call may initialise kernels and the pinned-memory pool
    on_gpu, count = syncs(call)
    assert count == expected
    torch.testing.assert_close(on_gpu.cpu(), on_cpu)


@cuda
def test_roi_pool_reads_the_window_sizes_once_however_many_chunks():
    """RoIs are pooled in chunks of similar window size; a copy of each chunk's indices to the
    GPU was a blocking copy, a sync per chunk. Now: the one read of the window sizes."""
    import sys

    from mrcnn_edu.ops import roi_pool

    module = sys.modules["mrcnn_edu.ops.roi_pool"]
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(64, 2, generator=generator) * 600
    sides = 8 + torch.rand(64, 2, generator=generator) * torch.logspace(0, 2.5, 64)[:, None]
    rois = torch.cat([torch.zeros(64, 1), corners, corners + sides], 1).cuda()  # windows of many sizes
    features = torch.randn(1, 8, 50, 84, device="cuda")
    call = lambda: roi_pool(features, rois, 7, 1 / 16, check_values=False)  # noqa: E731
    reference = call()  # the first call may initialise kernels and the pinned-memory pool
    x_start, y_start, width, height = module.quantise_rois(rois, 1 / 16)
    y_first, y_last = module._bin_edges(y_start, height, 7, 50)
    x_first, x_last = module._bin_edges(x_start, width, 7, 84)
    assert len(module._chunks_by_window(y_last - y_first, x_last - x_first, 7 * 7 * 8)[1]) > 2
    out, count = syncs(call)
    assert count == 1 and torch.equal(out, reference)
    torch.testing.assert_close(out.cpu(), roi_pool(features.cpu(), rois.cpu(), 7, 1 / 16), rtol=0, atol=0)
