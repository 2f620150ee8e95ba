"""Letterbox pre-processing and the inverse box mapping."""

import numpy as np
import pytest

from models.letterbox import PAD_VALUE, Letterbox, boxes_to_model, boxes_to_source, letterbox, paste, resize


@pytest.mark.parametrize(
    "src, dst, scale, pad_x, pad_y",
    [
        ((360, 640), (192, 320), 0.5, 0, 6),
        ((272, 640), (192, 320), 0.5, 0, 28),
        ((720, 1280), (192, 320), 0.25, 0, 6),
        ((480, 480), (192, 320), 0.4, 64, 0),
        ((96, 160), (192, 320), 2.0, 0, 0),
    ],
)
def test_fit(src, dst, scale, pad_x, pad_y):
    lb = Letterbox.fit(src, dst)
    assert (lb.scale, lb.pad_x, lb.pad_y) == (pytest.approx(scale), pad_x, pad_y)


@pytest.mark.parametrize("src", [(360, 640), (272, 640), (1080, 1920), (500, 333)])
def test_roundtrip_boxes(src):
    lb = Letterbox.fit(src, (192, 320))
    boxes = np.array([[10, 20, 100, 200], [0, 0, src[1], src[0]]], np.float32)
    back = boxes_to_source(boxes_to_model(boxes, lb), lb)
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_letterbox_image_layout_and_padding():
    img = np.full((272, 640, 3), 200, np.uint8)
    out, lb = letterbox(img, (192, 320))
    assert out.shape == (3, 192, 320) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert (out[:, : lb.pad_y] == PAD_VALUE).all() and (out[:, -lb.pad_y :] == PAD_VALUE).all()
    assert (out[:, lb.pad_y : 192 - lb.pad_y] == 200).all()


def test_a_marked_pixel_lands_where_the_transform_says():
    img = np.zeros((360, 640, 3), np.uint8)
    img[100:120, 300:340] = 255
    out, lb = letterbox(img, (192, 320), chw=False)
    x1, y1, x2, y2 = boxes_to_model(np.array([[300, 100, 340, 120]]), lb)[0]
    assert out[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2].min() == 255
    assert out[int(y2) + 2 :].max() < 255 or int(y2) + 2 >= 192


def test_boxes_to_source_clips():
    lb = Letterbox.fit((360, 640), (192, 320))
    out = boxes_to_source(np.array([[-10, -10, 400, 400]]), lb)
    assert out.tolist() == [[0, 0, 640, 360]]


@pytest.mark.parametrize("shape", [(10, 10), (10, 10, 4), (3, 10, 10)])
def test_bad_image_shape(shape):
    with pytest.raises(ValueError, match="expected an \\(H, W, 3\\) image"):
        letterbox(np.zeros(shape, np.uint8), (192, 320))


@pytest.mark.parametrize("src, dst, rows, cols", [((2, 4096), (256, 448), 1, 448), ((4096, 2), (256, 448), 256, 1)])
def test_a_sliver_keeps_one_row_or_column(src, dst, rows, cols):
    out, lb = letterbox(np.full((*src, 3), 200, np.uint8), dst)
    assert lb.resized_size == (rows, cols)
    picture = out[0] != PAD_VALUE
    assert picture.sum() == rows * cols and (out[:, picture] == 200).all()


# at (x, y) -> the canvas rows/columns [y0, y1) x [x0, x1) the 4x6 picture covers; outside nothing
@pytest.mark.parametrize(
    "at, covered",
    [
        ((2, 1), (1, 5, 2, 8)),  # inside
        ((-3, -2), (0, 2, 0, 3)),  # cut at the top left
        ((7, 8), (8, 10, 7, 10)),  # cut at the bottom right
        ((10, 0), None),  # entirely outside
        ((-6, -4), None),
    ],
)
@pytest.mark.parametrize("chw", [True, False])
def test_paste_places_and_cuts(at, covered, chw):
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = paste(image, (10, 10), at, chw=chw)
    hwc = out.transpose(1, 2, 0) if chw else out
    assert out.shape == ((3, 10, 10) if chw else (10, 10, 3)) and out.flags.c_contiguous
    expected = np.full((10, 10, 3), PAD_VALUE, np.uint8)
    if covered is not None:
        y0, y1, x0, x1 = covered
        x, y = at
        expected[y0:y1, x0:x1] = image[y0 - y : y1 - y, x0 - x : x1 - x]
    np.testing.assert_array_equal(hwc, expected)


def test_resize_is_a_no_op_at_the_same_size():
    image = np.zeros((6, 8, 3), np.uint8)
    assert resize(image, (6, 8)) is image
    assert resize(image, (3, 4)).shape == (3, 4, 3) and resize(image, (12, 16)).shape == (12, 16, 3)
