"""Plain-Python reference reads shared by tests (no tensors, no package code)."""


def bilinear(image, y: float, x: float) -> float:
    """RoIAlign's bilinear read of one point of ``image`` (nested lists, [row][column]) under
    torchvision's / Detectron2's rules: 0 beyond one pixel outside, clamped at the borders."""
    height, width = len(image), len(image[0])
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[y0][x0] + (1 - ly) * lx * image[y0][x1]
            + ly * (1 - lx) * image[y1][x0] + ly * lx * image[y1][x1])
