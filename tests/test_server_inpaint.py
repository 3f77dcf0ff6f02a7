"""Inpainting through the server: A1111's img2img ``mask`` fields and the native job API's, over real HTTP.

The default model (an ordinary U-Net, which blends) serves; a tiny random-weight inpainting model (a U-Net
of 9 input channels) is listed beside it and chosen per request with ``override_settings``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from serving import Background, LiveServer, decode_png, png_base64, wait_for
from tiny_models import diffusers_pipeline, diffusers_unet

from ldm.images import parse_parameters
from ldm.loading import load_components, save_single_file
from ldm.server.config import Limits, ServerConfig

SMALL = {"prompt": "a red square", "width": 64, "height": 64, "steps": 3, "cfg_scale": 3.0, "seed": 5}
BOX = (20, 16, 50, 40)


def init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    return Image.fromarray(np.stack([x * 4, y * 4, 255 - (x + y) * 2], axis=-1).clip(0, 255).astype(np.uint8))


def box_mask(value: int = 255) -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    x1, y1, x2, y2 = BOX
    mask[y1:y2, x1:x2] = value
    return Image.fromarray(mask)


def far_from_the_box(reach: int) -> np.ndarray:
    near = np.zeros((64, 64), dtype=bool)
    x1, y1, x2, y2 = BOX
    near[y1 - reach : y2 + reach, x1 - reach : x2 + reach] = True
    return ~near


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-inpaint")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root / "cache"))
        reference = diffusers_pipeline("sd1")
        reference.unet = diffusers_unet("sd1", in_channels=9)
        reference.save_pretrained(root / "inpainting")
        (root / "models").mkdir()
        save_single_file(load_components(root / "inpainting"), root / "models" / "tiny-inpainting.safetensors")
        limits = Limits(max_pixels=64 * 64 * 4, max_steps=500, max_images=4, max_prompt_chars=200, max_body_bytes=256 * 1024)
        server = LiveServer(ServerConfig(models_dir=root / "models", queue_size=2, limits=limits, device="cpu"))
        yield server
        server.stop()


@pytest.fixture
def http(live):
    with live.client() as client:
        yield client


def test_img2img_with_a_mask_takes_a1111s_defaults_keeps_the_rest_and_says_so(http):
    """A1111's API defaults: only masked (padding 0), masked content "fill", blur 4; the info and infotext say so."""
    request = {**SMALL, "init_images": [png_base64(init_image())], "mask": png_base64(box_mask()), "denoising_strength": 0.9}
    answer = http.post("/sdapi/v1/img2img", json=request)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    info = json.loads(body["info"])
    assert info["is_using_inpainting_conditioning"] is False  # the default model's U-Net blends
    expected = {"Mask blur": "4", "Inpaint area": "Only masked", "Masked area padding": "0", "Masked content": "fill"}
    assert {key: info["extra_generation_params"].get(key) for key in expected} == expected
    image = decode_png(body["images"][0])
    assert {key: parse_parameters(image.info["parameters"]).extra.get(key) for key in expected} == expected
    kept = far_from_the_box(int(2.5 * 4 + 0.5))
    ours, original = np.asarray(image.convert("RGB"), dtype=np.int16), np.asarray(init_image(), dtype=np.int16)
    assert np.array_equal(ours[kept], original[kept])
    assert np.abs(ours[~far_from_the_box(-6)] - original[~far_from_the_box(-6)]).mean() > 5
    assert body["parameters"]["mask"] is None  # as A1111: the images sent are not sent back


def test_an_inpainting_model_reads_the_mask_and_says_so(http):
    override = {"sd_model_checkpoint": "tiny-inpainting"}
    request = {
        **SMALL, "init_images": [png_base64(init_image())], "mask": png_base64(box_mask()), "mask_blur": 0,
        "inpaint_full_res": False, "inpainting_fill": 1, "inpainting_mask_invert": 1, "override_settings": override,
    }  # fmt: skip
    answer = http.post("/sdapi/v1/img2img", json=request)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["is_using_inpainting_conditioning"] is True
    assert info["extra_generation_params"]["Mask mode"] == "Inpaint not masked"
    assert not {"Mask blur", "Inpaint area", "Masked content"} & set(info["extra_generation_params"])
    image = np.asarray(decode_png(answer.json()["images"][0]).convert("RGB"), dtype=np.int16)
    x1, y1, x2, y2 = BOX  # inverted: the box is kept, the rest repainted
    assert np.array_equal(image[y1:y2, x1:x2], np.asarray(init_image(), dtype=np.int16)[y1:y2, x1:x2])
    txt2img = http.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": override})
    assert json.loads(txt2img.json()["info"])["is_using_inpainting_conditioning"] is True  # as A1111: a white mask


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"mask": "not base64!"}, "mask", "mask is not valid base64"),
        ({"mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x", "mask_blur_x and mask_blur_y differ"),
        ({"inpainting_fill": 7}, "inpainting_fill", "inpainting_fill must be 0 (fill), 1 (original)"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert", "must be 0 (inpaint masked) or 1"),
        ({"mask_blur": 99}, "mask_blur", "mask_blur must be from 0 to 64"),
        ({"mask": "BLACK"}, "mask", "mask is black everywhere"),
    ],
)
def test_bad_mask_fields_are_422s_naming_the_field(http, fields, where, message):
    request = {**SMALL, "init_images": [png_base64(init_image())], "mask": png_base64(box_mask()), **fields}
    if request["mask"] == "BLACK":
        request["mask"] = png_base64(Image.new("L", (64, 64), 0))
    answer = http.post("/sdapi/v1/img2img", json=request)
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", where] and message in detail["msg"]


def test_a_mask_without_an_init_image_is_a_422(http):
    answer = http.post("/sdapi/v1/txt2img", json={**SMALL, "mask": png_base64(box_mask())})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["msg"].startswith("mask needs an init_images")


def test_the_native_job_api_inpaints_with_ldms_defaults(http):
    """The job API takes the same fields; those left out are ldm's defaults (whole picture, original content)."""
    request = {**SMALL, "init_images": [png_base64(init_image())], "mask": png_base64(box_mask()), "mask_blur": 0, "denoising_strength": 0.9}
    job = http.post("/ldm/v1/jobs", json=request).json()
    done = wait_for(lambda: (status := http.get(job["url"]).json())["state"] in ("done", "failed") and status)
    assert done["state"] == "done", done.get("error")
    extra = parse_parameters(done["infotexts"][0]).extra
    assert "Inpaint area" not in extra and "Masked content" not in extra and "Mask blur" not in extra
    image = np.asarray(Image.open(io.BytesIO(http.get(done["images"][0]).content)).convert("RGB"), dtype=np.int16)
    outside = np.asarray(box_mask()) == 0
    assert np.array_equal(image[outside], np.asarray(init_image(), dtype=np.int16)[outside])


@pytest.mark.parametrize(("size", "only_masked"), [((96, 80), True), ((64, 64), False)])
def test_an_interrupted_inpainting_answers_its_image_pasted_over_the_init_image(http, size, only_masked):
    """As a finished one: the init image's size ("only masked" generates a 64 x 64 box of it), the pixels the mask
    leaves the init image's (an ordinary U-Net's known latents put back before the decode, then the paste)."""
    image, mask = init_image().resize(size), box_mask().resize(size, resample=Image.Resampling.NEAREST)
    request = {
        **SMALL, "steps": 500, "init_images": [png_base64(image)], "mask": png_base64(mask), "mask_blur": 0,
        "inpaint_full_res": only_masked, "inpainting_fill": 1, "denoising_strength": 1.0,
    }  # fmt: skip
    call = Background(http.post, "/sdapi/v1/img2img", json=request)
    wait_for(lambda: http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2)
    http.post("/sdapi/v1/interrupt")
    answer = call.result()
    assert answer.status_code == 200, answer.text
    ours = np.asarray(decode_png(answer.json()["images"][0]).convert("RGB"), dtype=np.int16)
    assert ours.shape[:2] == size[::-1]
    outside = np.asarray(mask) == 0
    assert np.array_equal(ours[outside], np.asarray(image, dtype=np.int16)[outside])
    assert np.abs(ours[~outside] - np.asarray(image, dtype=np.int16)[~outside]).mean() > 5  # stopped early, yet repainted
