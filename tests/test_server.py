"""ldm serve through real HTTP: A1111's API (shapes, defaults, names, errors), the queue, the job API.

One server (the default model, tiny limits) serves the whole module on a free loopback port;
requests make 64x64 images in a few steps. Long jobs (hundreds of steps) are only ever stopped.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from serving import Background, LiveServer, decode_png, png_data_url, wait_for
from test_lora_tags import write_lora

from ldm.images import parse_parameters
from ldm.loading import DEFAULT_MODEL_DIR, load_components, save_single_file
from ldm.loading.hashes import short_hash
from ldm.server.config import Limits, ServerConfig

SMALL = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 3.0}
LONG = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 500, "cfg_scale": 3.0, "seed": 1}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LDM_CACHE_DIR", str(root / "cache"))
        models, loras, embeddings = root / "models", root / "loras", root / "embeddings"
        for folder in (models, loras, embeddings):
            folder.mkdir()
        # A second model to switch to: the default one as one file, so its title carries A1111's hash.
        components = load_components(DEFAULT_MODEL_DIR)
        save_single_file(components, models / "shapes-copy.safetensors")
        (loras / "style.safetensors").write_bytes(b"listed, never loaded")
        write_lora(components.unet, components.text_encoder, loras / "tagged.safetensors", seed=0)  # for <lora:tagged:w>
        (embeddings / "token.pt").write_bytes(b"not an embedding: listed as skipped")
        # The default model's text encoder is 64 wide: one embedding it reads, one of SD 1.x's width it skips.
        torch.save({"string_to_param": {"*": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))}, "step": 300},
                   embeddings / "zorblat.pt")  # fmt: skip
        (embeddings / "sub").mkdir()  # A1111 reads subfolders too
        save_file({"emb_params": torch.zeros(1, 768)}, embeddings / "sub" / "wide.safetensors")
        limits = Limits(max_pixels=64 * 64 * 4, max_steps=1000, max_images=8, max_prompt_chars=200, max_body_bytes=256 * 1024)
        config = ServerConfig(
            models_dir=models, loras_dir=loras, embeddings_dir=embeddings, outputs=root / "outputs",
            queue_size=2, limits=limits, device="cpu",
        )
        server = LiveServer(config)
        yield server, root
        server.stop()


@pytest.fixture
def http(live):
    with live[0].client() as client:
        yield client


def start_long(http, **fields) -> tuple[Background, str]:
    """A txt2img of 500 steps in the background, and its job id once it is sampling."""
    call = Background(http.post, "/sdapi/v1/txt2img", json={**LONG, **fields})
    state = wait_for(lambda: (s := http.get("/sdapi/v1/progress").json()["state"])["sampling_step"] >= 2 and s)
    return call, state["job"].removeprefix("task(").removesuffix(")")


# --- txt2img / img2img ------------------------------------------------------------------------------


def test_txt2img_answers_images_parameters_and_info_that_match_the_request(http):
    request = {"prompt": "a blue square", "negative_prompt": "blurry", "seed": 7, "batch_size": 2, "n_iter": 2,
               "sampler_name": "Euler a", **SMALL}
    answer = http.post("/sdapi/v1/txt2img", json=request)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 4
    assert body["parameters"]["prompt"] == "a blue square" and body["parameters"]["steps"] == 3
    assert body["parameters"]["subseed"] == -1  # the request as A1111 echoes it, defaults included
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert info["all_prompts"] == ["a blue square"] * 4 and info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 3.0)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "ldm-shapes"
    for i, (image, text) in enumerate(zip(body["images"], info["infotexts"])):
        png = decode_png(image)
        assert png.size == (64, 64) and png.info["parameters"] == text
        params = parse_parameters(text)
        assert (params.seed, params.steps, params.sampler, params.cfg_scale) == (7 + i, 3, "Euler a", 3.0)
        assert (params.prompt, params.negative_prompt, params.width) == ("a blue square", "blurry", 64)


def test_variation_seeds_lean_each_image_toward_its_subseed_and_are_reported_as_a1111_does(http):
    request = {"prompt": "a blue square", "seed": 7, "subseed": 30, "subseed_strength": 0.3, "batch_size": 2, "n_iter": 2, **SMALL}
    body = http.post("/sdapi/v1/txt2img", json=request).json()
    info = json.loads(body["info"])
    assert info["subseed"] == 30 and info["all_subseeds"] == [30, 31, 32, 33] and info["subseed_strength"] == 0.3
    assert info["all_seeds"] == [7, 7, 7, 7]  # variations of one image: the seed stays, as in A1111
    extras = [parse_parameters(text).extra for text in info["infotexts"]]
    assert [(e["Variation seed"], e["Variation seed strength"]) for e in extras] == [(str(30 + i), "0.3") for i in range(4)]
    plain = http.post("/sdapi/v1/txt2img", json={**request, "subseed_strength": 0}).json()["images"]
    assert body["images"] != plain and http.post("/sdapi/v1/txt2img", json=request).json()["images"] == body["images"]


def test_txt2img_is_reproducible_by_seed_and_random_with_minus_one(http):
    one = http.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "seed": 11, **SMALL}).json()
    two = http.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "seed": 11, **SMALL}).json()
    assert one["images"] == two["images"]
    drawn = json.loads(http.post("/sdapi/v1/txt2img", json={"prompt": "a circle", **SMALL}).json()["info"])["seed"]
    assert 0 <= drawn < 2**32


def test_legacy_joined_sampler_name_sets_the_schedule_type(http):
    info = json.loads(http.post("/sdapi/v1/txt2img", json={"sampler_name": "DPM++ 2M Karras", "seed": 1, **SMALL}).json()["info"])
    params = parse_parameters(info["infotexts"][0])
    assert params.sampler == "DPM++ 2M" and params.extra["Schedule type"] == "Karras" and info["scheduler"] == "Karras"


def test_a_schedule_type_the_sampler_cannot_take_names_the_field(http):
    answer = http.post("/sdapi/v1/txt2img", json={"sampler_name": "DDIM", "scheduler": "Karras", **SMALL})
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["body", "scheduler"]


def test_unknown_sampler_is_a1111s_400(http):
    answer = http.post("/sdapi/v1/txt2img", json={"sampler_name": "Heun++ 9M", **SMALL})
    assert answer.status_code == 400 and answer.json() == {"detail": "Sampler not found"}


def test_img2img_takes_a_data_url_init_image(http):
    request = {"prompt": "a red square", "init_images": [png_data_url()], "denoising_strength": 0.5, "seed": 3, **SMALL, "steps": 4}
    answer = http.post("/sdapi/v1/img2img", json=request)
    assert answer.status_code == 200
    body = answer.json()
    assert body["parameters"]["init_images"] is None  # as A1111: not sent back
    params = parse_parameters(json.loads(body["info"])["infotexts"][0])
    assert params.extra["Denoising strength"] == "0.5" and params.seed == 3
    assert decode_png(body["images"][0]).size == (64, 64)
    plain = {**request, "init_images": [png_data_url().partition(",")[2]]}  # without the data: prefix
    assert http.post("/sdapi/v1/img2img", json=plain).json()["images"] == body["images"]


@pytest.mark.parametrize(
    "init_images",
    [["data:image/png;base64,@@not base64@@"], ["aGVsbG8gd29ybGQ="], [], None],
    ids=["bad-base64", "not-an-image", "empty", "missing"],
)
def test_img2img_without_a_readable_image_is_a_422_naming_init_images(http, init_images):
    answer = http.post("/sdapi/v1/img2img", json={"init_images": init_images, **SMALL})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "init_images"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": 0}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"batch_size": 4, "n_iter": 3}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"prompt": "x" * 201}, "prompt"),
        ({"negative_prompt": "x" * 201}, "negative_prompt"),
        ({"width": 128, "height": 136}, "width"),
        ({"seed": -2}, "seed"),
        ({"enable_hr": True, "hr_scale": 4}, "hr_scale"),
        ({"subseed_strength": 1.5}, "subseed_strength"),
        ({"subseed_strength": 0.5, "subseed": -2}, "subseed"),
        ({"seed_resize_from_h": 512}, "seed_resize_from_h"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"scheduler": "Cosine"}, "scheduler"),
    ],
)
def test_each_limit_and_bad_value_is_a_422_naming_its_field(http, change, field):
    answer = http.post("/sdapi/v1/txt2img", json={**SMALL, **change})
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", field]
    assert "Traceback" not in answer.text
    if change.get("steps") != "many":  # ldm's own messages name the JSON key; pydantic's name it in loc
        assert field.split(".")[-1] in detail["msg"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(http):
    answer = http.post("/sdapi/v1/img2img", json={"init_images": ["A" * 300_000]})
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    chunks = iter([b'{"init_images": ["', b"A" * 200_000, b"A" * 200_000, b'"]}'])  # no Content-Length: chunked
    streamed = http.post("/sdapi/v1/img2img", content=chunks, headers={"content-type": "application/json"})
    assert streamed.status_code == 413


# --- progress, interrupt, skip -----------------------------------------------------------------------


def test_progress_when_idle_has_a1111s_shape(http):
    body = http.get("/sdapi/v1/progress").json()
    assert body["progress"] == 0 and body["current_image"] is None
    assert {"job_count", "sampling_step", "sampling_steps", "interrupted", "skipped"} <= set(body["state"])
    assert body["state"]["job_count"] == 0


def test_interrupt_returns_the_images_so_far_early(http):
    call, job_id = start_long(http)
    running = http.get("/sdapi/v1/progress").json()
    assert running["state"]["sampling_steps"] == 500 and 0 < running["progress"] < 1
    assert decode_png(running["current_image"]).size == (8, 8)  # the latent preview, 1/8 of the image
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    body = call.result().json()
    assert len(body["images"]) == 1 and decode_png(body["images"][0]).size == (64, 64)
    job = http.get(f"/ldm/v1/jobs/{job_id}").json()
    assert job["state"] == "done" and 2 <= job["step"] < 500
    assert job["images"] == [] and len(job["infotexts"]) == 1  # handed back, not kept in memory


def test_skip_ends_the_current_batch_and_goes_on_with_the_next(http):
    call, job_id = start_long(http, n_iter=2)
    http.post("/sdapi/v1/skip")
    wait_for(lambda: (s := http.get("/sdapi/v1/progress").json()["state"])["job_no"] == 1 and s["sampling_step"] >= 2)
    http.post("/sdapi/v1/interrupt")
    body = call.result().json()
    assert len(body["images"]) == 2  # the skipped batch's image and the interrupted one's
    assert json.loads(body["info"])["all_seeds"] == [1, 2]


# --- options, models, lists --------------------------------------------------------------------------


def test_switching_the_model_waits_for_the_running_job_which_keeps_its_model(http, live):
    copy_title = f"shapes-copy.safetensors [{short_hash(live[1] / 'models' / 'shapes-copy.safetensors')}]"
    job, _ = start_long(http)
    switch = Background(http.post, "/sdapi/v1/options", json={"sd_model_checkpoint": copy_title})
    time.sleep(0.3)
    assert switch.finished_at is None  # waiting for the running job
    http.post("/sdapi/v1/interrupt")
    try:
        old = parse_parameters(json.loads(job.result().json()["info"])["infotexts"][0])
        assert switch.result().status_code == 200 and switch.finished_at >= job.finished_at
        assert old.model == "ldm-shapes"
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == copy_title
        new = parse_parameters(json.loads(http.post("/sdapi/v1/txt2img", json={"seed": 1, **SMALL}).json()["info"])["infotexts"][0])
        assert new.model == "shapes-copy" and new.extra["Model hash"] == copy_title[-11:-1]
    finally:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ldm-shapes"}).status_code == 200


@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "../models/shapes-copy.safetensors", "nope"])
def test_a_model_name_outside_the_listing_is_404(http, name):
    assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}).status_code == 404
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "ldm-shapes"


def test_a_request_runs_on_the_model_its_override_settings_name(http):
    copy = {**SMALL, "seed": 1, "override_settings": {"sd_model_checkpoint": "shapes-copy.safetensors"}}
    text = json.loads(http.post("/sdapi/v1/txt2img", json=copy).json()["info"])["infotexts"][0]
    assert parse_parameters(text).model == "shapes-copy"
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "ldm-shapes"  # restored afterwards
    for name in ("../../x", "/etc/passwd", "../models/shapes-copy.safetensors"):
        answer = http.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": name}})
        assert answer.status_code == 404 and "not found" in answer.json()["detail"]
    try:
        kept = {**copy, "override_settings": {"sd_model_checkpoint": "shapes-copy"}, "override_settings_restore_afterwards": False}
        assert http.post("/sdapi/v1/txt2img", json=kept).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("shapes-copy.safetensors [")
    finally:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ldm-shapes"}).status_code == 200


def test_clip_skip_option_applies_to_later_requests(http):
    assert http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        assert http.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        text = json.loads(http.post("/sdapi/v1/txt2img", json={"seed": 1, **SMALL}).json()["info"])["infotexts"][0]
        assert parse_parameters(text).extra["Clip skip"] == "2"
    finally:
        http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert http.post("/sdapi/v1/options", json={"sd_vae": "vae-ft-mse.safetensors"}).status_code == 404


def test_sd_models_lists_titles_with_hashes(http, live):
    models = http.get("/sdapi/v1/sd-models").json()
    digest = short_hash(live[1] / "models" / "shapes-copy.safetensors")
    assert [m["title"] for m in models] == ["ldm-shapes", f"shapes-copy.safetensors [{digest}]"]
    assert models[1]["model_name"] == "shapes-copy" and models[1]["hash"] == digest and len(models[1]["sha256"]) == 64
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert http.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_samplers_and_schedulers_use_a1111_names(http):
    samplers = {s["name"]: s for s in http.get("/sdapi/v1/samplers").json()}
    assert {"DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and samplers["DPM++ 2M"]["options"] == {}
    labels = [s["label"] for s in http.get("/sdapi/v1/schedulers").json()]
    assert labels == ["Automatic", "Karras", "Exponential"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/sdapi/v1/sd-vae", []),
        ("/sdapi/v1/upscalers", []),
        ("/sdapi/v1/script-info", []),
        ("/sdapi/v1/prompt-styles", []),
        ("/sdapi/v1/realesrgan-models", []),
        ("/sdapi/v1/sd-modules", []),
        ("/sdapi/v1/extensions", []),
        ("/sdapi/v1/face-restorers", []),
        ("/sdapi/v1/hypernetworks", []),
        ("/sdapi/v1/latent-upscale-modes", []),
        ("/sdapi/v1/scripts", {"txt2img": [], "img2img": []}),
    ],
)
def test_lists_ldm_has_nothing_for_are_empty_in_the_right_shape(http, path, expected):
    answer = http.get(path)
    assert answer.status_code == 200 and answer.json() == expected


def test_loras_embeddings_and_memory(http):
    loras = http.get("/sdapi/v1/loras").json()
    assert [(l["name"], l["alias"]) for l in loras] == [("style", "style"), ("tagged", "tagged")]
    assert loras[0]["path"].endswith("style.safetensors")
    assert http.get("/sdapi/v1/embeddings").json() == {
        "loaded": {"zorblat": {"step": 300, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64, "vectors": 2}},
        "skipped": {
            "token": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None},
            "wide": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 1},
        },
    }
    memory = http.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "cuda" in memory


def test_a_prompt_that_names_an_embedding_uses_it_and_its_infotext_says_so(http, live):
    request = {"prompt": "a zorblat circle", "seed": 4, **SMALL}
    used = http.post("/sdapi/v1/txt2img", json=request).json()
    plain = http.post("/sdapi/v1/txt2img", json={**request, "prompt": "a circle"}).json()
    assert used["images"] != plain["images"]
    digest = hashlib.sha256((live[1] / "embeddings" / "zorblat.pt").read_bytes()).hexdigest()[:12]
    assert parse_parameters(json.loads(used["info"])["infotexts"][0]).extra["TI hashes"] == f"zorblat: {digest}"
    assert "TI hashes" not in parse_parameters(json.loads(plain["info"])["infotexts"][0]).extra


def test_png_info_reads_back_the_parameters(http):
    image = http.post("/sdapi/v1/txt2img", json={"prompt": "a tiny star", "seed": 5, **SMALL}).json()["images"][0]
    body = http.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert body["parameters"]["Prompt"] == "a tiny star" and body["parameters"]["Seed"] == 5
    assert body["info"] == body["items"]["parameters"] and body["info"].startswith("a tiny star")
    assert http.post("/sdapi/v1/png-info", json={"image": "%%"}).json()["detail"][0]["loc"] == ["body", "image"]


def test_prompt_editing_changes_the_image_and_stays_in_the_infotext(http):
    edited = http.post("/sdapi/v1/txt2img", json={"prompt": "[a circle:a square:0.5]", "seed": 3, **SMALL}).json()
    plain = http.post("/sdapi/v1/txt2img", json={"prompt": "a circle", "seed": 3, **SMALL}).json()
    assert edited["images"][0] != plain["images"][0]
    assert parse_parameters(json.loads(edited["info"])["infotexts"][0]).prompt == "[a circle:a square:0.5]"
    refused = http.post("/sdapi/v1/txt2img", json={"prompt": "a AND b", **SMALL, "cfg_scale": 1.0})
    assert refused.status_code == 422 and "sub-prompts" in refused.text


def test_save_images_writes_only_under_outputs(http, live):
    outputs = live[1] / "outputs"
    before = set(outputs.glob("*.png")) if outputs.exists() else set()
    http.post("/sdapi/v1/txt2img", json={"seed": 21, "save_images": True, **SMALL}).raise_for_status()
    written = set(outputs.glob("*.png")) - before
    assert len(written) == 1 and next(iter(written)).name.endswith("-21.png")
    assert [p.name for p in outputs.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --- the queue -----------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_jobs_cancel(http):
    running = http.post("/ldm/v1/jobs", json=LONG).json()["id"]
    wait_for(lambda: http.get(f"/ldm/v1/jobs/{running}").json()["step"] >= 1)
    waiting = [http.post("/ldm/v1/jobs", json={**SMALL, "seed": i}) for i in range(2)]
    assert [w.status_code for w in waiting] == [202, 202] and [w.json()["position"] for w in waiting] == [0, 1]
    listed = http.get("/ldm/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [running] + [w.json()["id"] for w in waiting]
    full = http.post("/ldm/v1/jobs", json=SMALL)
    assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
    overflow = http.post("/sdapi/v1/txt2img", json=SMALL)  # the A1111 routes share the queue
    assert overflow.status_code == 429
    for job in [w.json()["id"] for w in waiting] + [running]:
        assert http.delete(f"/ldm/v1/jobs/{job}").status_code == 200
    assert wait_for(lambda: http.get(f"/ldm/v1/jobs/{running}").json()["state"] == "cancelled")
    assert http.get(f"/ldm/v1/jobs/{running}").json()["images"] == []
    assert http.delete(f"/ldm/v1/jobs/{running}").status_code == 409
    assert http.delete("/ldm/v1/jobs/0123abcd").status_code == 404


def test_a_failing_job_fails_alone(http, live):
    # Without a size the model's (64) is used; 5 images of it are over --max-pixels, found by the worker.
    failing = http.post("/ldm/v1/jobs", json={"batch_size": 5, "steps": 2}).json()["id"]
    after = http.post("/ldm/v1/jobs", json={**SMALL, "seed": 2}).json()["id"]
    assert wait_for(lambda: http.get(f"/ldm/v1/jobs/{after}").json()["state"] in ("done", "failed"))
    failed = http.get(f"/ldm/v1/jobs/{failing}").json()
    assert failed["state"] == "failed" and "--max-pixels" in failed["error"]
    assert http.get(f"/ldm/v1/jobs/{after}").json()["state"] == "done"


def test_a_crash_in_a_job_is_a_500_without_traceback_and_the_next_job_runs(http, live, monkeypatch):
    engine = live[0].server_state.engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine.pipeline, "generate", broken)
    answer = http.post("/sdapi/v1/txt2img", json=SMALL)
    assert answer.status_code == 500 and "secret" not in answer.text and "Traceback" not in answer.text
    monkeypatch.undo()
    assert http.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_a_client_that_disconnects_mid_job_does_not_stop_the_server(http, live):
    import httpx

    with live[0].client(timeout=httpx.Timeout(60, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/sdapi/v1/txt2img", json=LONG)
    state = wait_for(lambda: (s := http.get("/sdapi/v1/progress").json()["state"])["sampling_step"] >= 1 and s)
    http.post("/sdapi/v1/interrupt")
    job_id = state["job"].removeprefix("task(").removesuffix(")")
    assert wait_for(lambda: http.get(f"/ldm/v1/jobs/{job_id}").json()["state"] == "done")
    assert http.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 4}).status_code == 200


# --- the native job API ----------------------------------------------------------------------------


def test_a_job_streams_its_progress_and_ends_with_image_urls(http, live, monkeypatch):
    # The job waits after its first step until the stream has shown it running: a few 64 px steps
    # would otherwise end between two polls of the stream, and the running state would never show.
    engine, shown_running = live[0].server_state.engine, threading.Event()
    generate = engine.pipeline.generate

    def generate_pausing(settings, callback=None, **kwargs):
        def after_step(*args):
            callback(*args)
            shown_running.wait(timeout=30)

        return generate(settings, callback=after_step, **kwargs)

    monkeypatch.setattr(engine.pipeline, "generate", generate_pausing)
    submitted = http.post("/ldm/v1/jobs", json={"prompt": "a green triangle", "seed": 9, "steps": 4, "n_iter": 2})
    assert submitted.status_code == 202
    job = submitted.json()
    assert job["url"] == f"/ldm/v1/jobs/{job['id']}"
    events = []
    with http.stream("GET", f"{job['url']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append([line[7:]])
            elif line.startswith("data: "):
                events[-1].append(json.loads(line[6:]))
                if events[-1][1]["state"] == "running" and events[-1][1]["step"] >= 1:
                    shown_running.set()
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"progress"}
    assert any(data["state"] == "running" and data["step"] >= 1 for _, data in events)
    done = events[-1][1]
    assert done["seeds"] == [9, 10] and len(done["images"]) == 2 and done["progress"] == 1
    png = http.get(done["images"][1])
    assert png.headers["content-type"] == "image/png"
    assert parse_parameters(decode_png_bytes(png.content)).seed == 10 and done["infotexts"][1].startswith("a green triangle")
    assert http.get(f"{job['url']}/images/2").status_code == 404


def test_a_done_jobs_parameters_make_the_same_image_again(http):
    def finished(fields: dict) -> dict:
        url = http.post("/ldm/v1/jobs", json=fields).json()["url"]
        return wait_for(lambda: (s := http.get(url).json())["state"] == "done" and s)

    first = finished({"prompt": "a red circle", "negative_prompt": "blue", "seed": 5, "batch_size": 2,
                      "sampler_name": "Euler a", "scheduler": "Karras", **SMALL})
    params = first["parameters"][1]
    assert params == {"prompt": "a red circle", "negative_prompt": "blue", "seed": 6, "steps": 3, "cfg_scale": 3.0,
                      "width": 64, "height": 64, "sampler_name": "Euler a", "scheduler": "Karras"}
    again = finished(params)  # the fields as they are, as the web page's "Use these settings" sends them
    assert again["infotexts"] == [first["infotexts"][1]]
    # The same image: the same noise and settings; a U-Net call on a batch of one image instead of two sums in
    # another order (float rounding, about 1e-5 of the pixel range), which may move a pixel by one level.
    pixels = [_pixels(http.get(url).content) for url in (again["images"][0], first["images"][1])]
    assert np.abs(pixels[0] - pixels[1]).max() <= 1 and (pixels[0] != pixels[1]).mean() < 0.01


def test_a_lora_tag_applies_to_its_own_request_and_its_infotext(http, live):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 7, **SMALL}
    plain = http.post("/sdapi/v1/txt2img", json=body).json()
    tagged = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red circle <lora:tagged:0.5>"}).json()
    after = http.post("/sdapi/v1/txt2img", json=body).json()
    pixels = [decode_png(answer["images"][0]).tobytes() for answer in (plain, tagged, after)]
    assert pixels[1] != pixels[0] and pixels[2] == pixels[0]
    data = (live[1] / "loras" / "tagged.safetensors").read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    infotext = json.loads(tagged["info"])["infotexts"][0]
    assert infotext.startswith("a red circle <lora:tagged:0.5>\n") and f'Lora hashes: "tagged: {digest}"' in infotext
    assert "Lora" not in json.loads(after["info"])["infotexts"][0]
    init = http.post("/sdapi/v1/img2img", json={**body, "prompt": "<lora:tagged:1> a circle", "init_images": [png_data_url()]}).json()
    assert f'Lora hashes: "tagged: {digest}"' in json.loads(init["info"])["infotexts"][0]


@pytest.mark.parametrize(
    ("path", "prompt", "message"),
    [
        ("/sdapi/v1/txt2img", "a <lora:missing:1>", "LoRA 'missing' not found in"),
        ("/sdapi/v1/txt2img", "a <hypernet:x:1>", "kind 'hypernet' that ldm does not apply"),
        ("/ldm/v1/jobs", "a <lora:tagged:big>", "has the weight 'big', which is not a number"),
    ],
)
def test_a_bad_lora_tag_is_a_422_naming_prompt(http, path, prompt, message):
    answer = http.post(path, json={**SMALL, "prompt": prompt})
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"] == ["body", "prompt"] and message in detail["msg"]


def _png(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(_png(png), dtype=np.int16)


def decode_png_bytes(data: bytes) -> str:
    return _png(data).info["parameters"]


def test_unknown_job_is_404(http):
    assert http.get("/ldm/v1/jobs/feedbeef").status_code == 404
    assert http.get("/ldm/v1/jobs/feedbeef/events").status_code == 404


def test_a_job_wakes_its_waiters_when_it_finishes_and_late_waiters_at_once():
    """A1111's txt2img waits for its job without polling: the worker wakes it (ldm.server.a1111.finished)."""
    import asyncio

    from ldm.server.a1111 import finished
    from ldm.server.jobs import Job

    job = Job(request=None)
    calls: list[str] = []
    job.when_finished(lambda: calls.append("early"))
    assert calls == []

    async def wait_then_finish() -> float:
        loop = asyncio.get_running_loop()
        threading.Timer(0.05, job.mark_finished).start()  # the worker's thread finishes the job
        start = loop.time()
        await asyncio.wait_for(finished(job), timeout=5)
        return loop.time() - start

    assert 0.04 <= asyncio.run(wait_then_finish()) < 2 and job.done.is_set() and calls == ["early"]
    job.when_finished(lambda: calls.append("late"))
    assert calls == ["early", "late"]
