"""Images in prompts (Gemma 4's vision tower, through mlx-vlm): against transformers'
references, with and without the drafter, batched, in kept conversations, in the CLI and the
server, and every way an image can be bad."""

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image as PILImage

import mlx.core as mx
import mlx_mtp
from mlx_mtp.conversation import render
from mlx_mtp.images import MAX_IMAGE_BYTES, MAX_IMAGES, ImageError
from mlx_mtp.request import GenerationRequest

from conftest import FIXTURES, ContinuationProposer
from test_server import Server

IMAGES = FIXTURES / "images"
REF = np.load(IMAGES / "reference.npz")
DRAFTER = FIXTURES / "drafter_dense"  # target_mm's language model is target_31b's
BOS, BOI, EOI, IMAGE = 2, 6, 7, 8
# A Gemma 4-like template: one image token per image part (the fixture's own template has no images).
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image_soft_token>"
    "{% else %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def multimodal(tmp_path, variant="causal", source=None):
    """A copy of a multimodal fixture with the image settings the references used, a chat
    template that takes images, and for "vision" bidirectional attention within images
    ("e2b": E2B's language model, with per-layer inputs and KV-shared layers)."""
    source = source or (IMAGES / "target_mm_e2b" if variant == "e2b" else FIXTURES / "target_mm")
    path = tmp_path / f"{source.name}_{variant}"
    shutil.copytree(source, path)
    shutil.copy(IMAGES / "processor_config.json", path)
    config = json.loads((path / "config.json").read_text())
    if variant == "vision":
        config["text_config"]["use_bidirectional_attention"] = "vision"
    (path / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def pair_of(path, drafter=DRAFTER):
    return mlx_mtp.load(str(path), None if drafter is None else str(drafter))


def placeholders(prompt):
    """The reference prompt with one image token per image (what a template writes)."""
    out, i = [], 0
    while i < len(prompt):
        if prompt[i] == BOI:
            out.append(IMAGE)
            i = prompt.index(EOI, i) + 1
        else:
            out.append(prompt[i])
            i += 1
    return out


PROMPT = placeholders([int(t) for t in REF["prompt"]])
FILES = [IMAGES / "square.png", IMAGES / "wide.png"]


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


VARIANTS = ["causal", "vision", "e2b"]
DRAFTERS = {"causal": DRAFTER, "vision": DRAFTER, "e2b": FIXTURES / "drafter_sparse"}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("step", [2048, 5])
def test_the_target_reads_images_as_transformers_does(tmp_path, variant, step):
    """Both Gemma 4 attention layouts (causal; sliding layers both ways within an image),
    E2B's per-layer inputs, the prompt read whole and in chunks of 5 ids (which would split
    each image)."""
    pair = pair_of(multimodal(tmp_path, variant), DRAFTERS[variant])
    request = GenerationRequest(max_tokens=24, logprobs=20, draft_tokens=0)
    chunks = list(mlx_mtp.stream_generate(pair, PROMPT, images=FILES, request=request, prefill_step_size=step))
    assert chunks[0].logprobs is not None
    first, top = chunks[0].logprobs[0]
    expected = log_softmax(REF[f"{variant}_last_logits"].astype(np.float64))
    assert [t for t, _ in top] == list(np.argsort(-expected)[:20])
    assert np.allclose([lp for _, lp in top], np.sort(expected)[::-1][:20], atol=1e-4)
    assert sum((c.tokens for c in chunks), []) == REF[f"{variant}_greedy"].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_with_the_drafter_equals_the_target_alone(tmp_path, variant):
    pair = pair_of(multimodal(tmp_path, variant), DRAFTERS[variant])
    expected = REF[f"{variant}_greedy"].tolist()
    for k in (None, 1, 4):
        out = mlx_mtp.generate(pair, PROMPT, images=FILES, max_tokens=24, num_draft_tokens=k, prefill_step_size=7)
        assert out.tokens == expected, k
        assert k == 1 or out.stats.drafted_tokens > 0
    # (the fixture drafter, distilled on text, accepts little after an image) drafts right
    # and wrong at every position, verified with the image positions in the cache
    oracle = ContinuationProposer([[int(t) for t in REF["prompt"]] + expected], noise=0.3, seed=1)
    out = mlx_mtp.generate(pair, PROMPT, images=FILES, max_tokens=24, num_draft_tokens=4, proposer=oracle)
    assert out.tokens == expected
    assert 0 < out.stats.accepted_tokens < out.stats.drafted_tokens


def test_an_mlx_vlm_conversion_reads_images_like_its_source(tmp_path):
    """mlx_vlm.convert's 8-bit conversion of target_mm: its vision tower (left in float32)
    gives the source's embeddings, and the drafter changes nothing."""
    source = pair_of(multimodal(tmp_path), None)
    converted = pair_of(multimodal(tmp_path, source=FIXTURES / "converted" / "vlm_8bit"))
    images = mlx_mtp.prepare_images(converted, FILES)
    ours = source.target.vision.tower(64, mx.float32)(images)
    theirs = converted.target.vision.tower(64, mx.float32)(images)
    for a, b in zip(ours, theirs):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5)
    plain = mlx_mtp.generate(converted, PROMPT, images=images, max_tokens=24, num_draft_tokens=0)
    drafted = mlx_mtp.generate(converted, PROMPT, images=images, max_tokens=24, num_draft_tokens=3)
    assert drafted.tokens == plain.tokens and len(plain.tokens) == 24


def other_square(tmp_path):
    """An image of square.png's size (so the same soft token ids) with other pixels."""
    path = tmp_path / "other.png"
    PILImage.open(IMAGES / "square.png").transpose(PILImage.Transpose.ROTATE_90).save(path)
    return path


def test_a_batch_with_images_and_without_equals_each_alone(tmp_path):
    pair = pair_of(multimodal(tmp_path, "vision"))
    text = [BOS] + list(range(40, 60))
    rows = [(PROMPT, FILES), (text, []), ([BOS, IMAGE, 30, 31], [other_square(tmp_path)]), (text[:9], [])]
    solo = [mlx_mtp.generate(pair, p, images=i, max_tokens=16, num_draft_tokens=2, prefill_step_size=16)
            for p, i in rows]
    batch = mlx_mtp.batch_generate(pair, [p for p, _ in rows], images=[i for _, i in rows], max_tokens=16,
                                   num_draft_tokens=2, prefill_step_size=16)
    assert [r.tokens for r in batch] == [r.tokens for r in solo]
    assert solo[0].tokens == REF["vision_greedy"].tolist()[:16]


def test_a_prompt_without_placeholders_gets_the_images_after_bos(tmp_path):
    pair = pair_of(multimodal(tmp_path))
    text = [BOS, 20, 21, 22]
    placed = mlx_mtp.generate(pair, [BOS, IMAGE, 20, 21, 22], images=FILES[:1], max_tokens=8)
    assert mlx_mtp.generate(pair, text, images=FILES[:1], max_tokens=8).tokens == placed.tokens


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(server, path_or_url, text="what is it?", **kwargs):
    url = path_or_url if isinstance(path_or_url, str) else data_url(path_or_url)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": text}]}]
    return server.client.chat.completions.create(model=server.model, messages=messages, max_tokens=12,
                                                 temperature=0, **kwargs)


def expected_reply(pair, image, text="what is it?", tokens=12):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = render(pair, messages)
    return mlx_mtp.generate(pair, prompt, images=[image], max_tokens=tokens, num_draft_tokens=2,
                            prefill_step_size=32).text


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images")
    path = multimodal(tmp, "vision")
    (tmp / "served").mkdir()
    shutil.copy(IMAGES / "wide.png", tmp / "served" / "wide.png")
    server = Server("--draft-tokens", 2, "--prefill-step-size", 32, "--image-dir", tmp / "served",
                    target=path, drafter=DRAFTER)
    server.tmp = tmp
    yield server
    server.stop()


def test_the_server_answers_image_parts_as_generate_does(image_server):
    pair = pair_of(image_server.model)
    assert "images: on (up to 70 soft tokens each)" in image_server.log()  # the tower loaded at start
    reply = ask(image_server, IMAGES / "square.png")
    assert reply.choices[0].message.content == expected_reply(pair, IMAGES / "square.png")
    # a file under --image-dir, by path or file:// URL
    wide = expected_reply(pair, IMAGES / "wide.png")
    assert ask(image_server, "wide.png").choices[0].message.content == wide
    assert ask(image_server, f"file://{image_server.tmp / 'served' / 'wide.png'}").choices[0].message.content == wide
    streamed = ask(image_server, IMAGES / "square.png", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content


def test_a_kept_conversation_is_not_reused_for_another_image_with_the_same_ids(image_server, tmp_path):
    """Two images of one size have the same soft token ids: the second request must read its
    own image, not the first one's KV (the kept conversation is keyed on the images' bytes)."""
    pair = pair_of(image_server.model)
    other = other_square(tmp_path)
    first = ask(image_server, IMAGES / "square.png")
    second = ask(image_server, other)
    assert second.choices[0].message.content == expected_reply(pair, other)
    assert first.choices[0].message.content != second.choices[0].message.content
    # the same image again reuses the kept conversation: only the ids after it are read
    again = ask(image_server, other)
    assert again.choices[0].message.content == second.choices[0].message.content
    assert again.model_extra["mtp"]["prompt_tokens_read"] < again.usage.prompt_tokens - 64


BAD_IMAGES = {
    "corrupt": lambda tmp: (tmp / "c.png", (IMAGES / "square.png").read_bytes()[:300], "a corrupt or truncated image"),
    "not an image": lambda tmp: (tmp / "t.png", b"hello, this is text", "not an image"),
    "tiff": lambda tmp: (tmp / "i.tiff", None, "unsupported image format TIFF"),
    "too many pixels": lambda tmp: (tmp / "big.png", None, "pixels, over the"),
}


def bad_image(tmp, kind):
    path, data, message = BAD_IMAGES[kind](tmp)
    if kind == "tiff":
        PILImage.open(IMAGES / "square.png").save(path)
    elif kind == "too many pixels":
        PILImage.new("L", (8000, 8000)).save(path)
    else:
        path.write_bytes(data)
    return path, message


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_image_is_a_one_line_error(tmp_path, kind):
    pair = pair_of(multimodal(tmp_path))
    path, message = bad_image(tmp_path, kind)
    with pytest.raises(ImageError, match=message):
        mlx_mtp.prepare_images(pair, [path])


def test_requests_an_image_target_cannot_take(tmp_path):
    pair = pair_of(multimodal(tmp_path))
    with pytest.raises(ImageError, match=f"over the {MAX_IMAGES}"):
        mlx_mtp.generate(pair, PROMPT, images=[IMAGES / "square.png"] * (MAX_IMAGES + 1))
    with pytest.raises(ImageError, match="2 image placeholder"):
        mlx_mtp.generate(pair, PROMPT, images=FILES[:1])
    with pytest.raises(ImageError, match="no vision tower"):
        mlx_mtp.generate(pair_of(FIXTURES / "target_31b"), [BOS, 20], images=FILES[:1])
    with pytest.raises(ImageError, match="images must be a list of paths, bytes or Images, got int"):
        mlx_mtp.generate(pair, PROMPT, images=5)
    for bad in (5, None, float("nan")):
        with pytest.raises(ImageError, match="an image is a file's path or its bytes, got"):
            mlx_mtp.prepare_images(pair, [bad])
    (tmp_path / "big.png").write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(ImageError, match="over the"):
        mlx_mtp.prepare_images(pair, [tmp_path / "big.png"])
    with pytest.raises(ValueError, match="the prompt needs"):  # images count toward the context
        mlx_mtp.generate(pair, [BOS] + [IMAGE] * 15 + [20] * 3960, images=FILES * 7 + FILES[:1])


def run_cli(*args, stdin=None):
    cmd = [sys.executable, "-c", "from mlx_mtp.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=300)


def test_generate_and_chat_take_images(tmp_path):
    path = multimodal(tmp_path)
    pair = pair_of(path)
    out = run_cli("generate", "what is it?", "--chat", "--target", path, "--drafter", DRAFTER, "--image",
                  IMAGES / "square.png", "--max-tokens", 12, "--json")
    assert out.returncode == 0, out.stderr
    expected = mlx_mtp.generate(pair, render(
        pair, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]),
        images=[IMAGES / "square.png"], max_tokens=12)
    assert json.loads(out.stdout)["tokens"] == expected.tokens
    chat = run_cli("chat", "--target", path, "--drafter", DRAFTER, "--max-tokens", 12,
                   stdin=f"/image {tmp_path / 'missing.png'}\n/image {IMAGES / 'square.png'}\nwhat is it?\n")
    assert chat.returncode == 0, chat.stderr
    assert "/image PATH  /reset" in chat.stdout  # the banner offers it to a target with a tower
    assert "cannot read" in chat.stdout and "goes with your next message" in chat.stdout
    assert expected.text in chat.stdout


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "cannot read"),
    (["--image", "corrupt.png"], "a corrupt or truncated image"),
    (["--target", FIXTURES / "target_31b", "--image", IMAGES / "square.png"], "has no vision tower"),
])
def test_generate_refuses_bad_images_in_one_line(tmp_path, args, message):
    (tmp_path / "corrupt.png").write_bytes((IMAGES / "square.png").read_bytes()[:300])
    args = [a if not isinstance(a, str) or not a.endswith(".png") or "/" in a else tmp_path / a for a in args]
    if "--target" not in args:
        args += ["--target", multimodal(tmp_path)]
    out = run_cli("generate", "hi", *args)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_without_the_vision_extra_an_image_names_it(tmp_path):
    code = ("import sys; sys.modules['mlx_vlm'] = None\n"
            "import mlx_mtp\n"
            f"pair = mlx_mtp.load({str(multimodal(tmp_path))!r})\n"
            "try:\n"
            f"    mlx_mtp.prepare_images(pair, [{str(IMAGES / 'square.png')!r}])\n"
            "except mlx_mtp.ImageError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == 'images need the vision extra: pip install "mlx-mtp[vision]"', out.stderr


def test_a_text_load_reads_no_vision_weights_and_imports_no_mlx_vlm(tmp_path):
    code = ("import sys, mlx_mtp\n"
            f"pair = mlx_mtp.load({str(multimodal(tmp_path))!r})\n"
            "print(pair.target.vision.image_token, pair.target.vision._tower, 'mlx_vlm' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["8", "None", "False"], out.stderr


class Pictures(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(IMAGES), **kwargs)

    def log_message(self, *args):
        pass


def test_the_server_refuses_bad_images_and_goes_on(image_server, tmp_path):
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{web.server_address[1]}/square.png"
    corrupt, _ = bad_image(tmp_path, "corrupt")
    cases = [
        (data_url(corrupt), "a corrupt or truncated image"),
        ("data:image/png;base64,@@@@", "base64 is not valid"),
        ("data:image/png,rawbytes", "must be base64"),
        (remote, "fetches no image URLs"),
        ("../square.png", "must lie under"),
        ("/etc/passwd", "must lie under"),
        ("nothere.png", "cannot read"),
    ]
    for url, message in cases:
        body = {"model": image_server.model, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]}]}
        r = image_server.post("/v1/chat/completions", body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (url, r.text)
    body = {"model": image_server.model, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "not-an-object"}]}]}
    assert image_server.post("/v1/chat/completions", body).status_code == 400
    assert ask(image_server, IMAGES / "square.png").choices[0].finish_reason == "length"  # still serving
    # with --allow-remote-images, the same URL is fetched
    remote_server = Server("--draft-tokens", 2, "--prefill-step-size", 32, "--allow-remote-images",
                           target=image_server.model, drafter=DRAFTER)
    try:
        reply = ask(remote_server, remote)
        assert reply.choices[0].message.content == ask(image_server, IMAGES / "square.png").choices[0].message.content
    finally:
        remote_server.stop()
        web.shutdown()


def test_a_text_only_server_refuses_images(tmp_path):
    server = Server("--draft-tokens", 2)
    try:
        r = server.post("/v1/chat/completions", {"model": server.model, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES / "square.png")}}]}]})
        assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_a_checkpoint_whose_config_has_a_tower_but_not_its_weights(tmp_path):
    path = multimodal(tmp_path)
    weights = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"), {k: v for k, v in weights.items() if "vision" not in k})
    pair = pair_of(path)
    assert mlx_mtp.generate(pair, [BOS, 20, 21], max_tokens=4).finish_reason == "length"  # text still works
    with pytest.raises(ValueError, match="the config has a vision tower but the weights have none"):
        mlx_mtp.generate(pair, PROMPT, images=FILES)


def test_soft_tokens_without_their_image_are_refused(tmp_path):
    """(Else a kept conversation read from literal soft tokens could stand in for an image.)"""
    pair = pair_of(multimodal(tmp_path))
    with pytest.raises(ImageError, match=r"image soft tokens \(\[64\]\) do not match its images \(\[\]\)"):
        mlx_mtp.generate(pair, [BOS, BOI] + [IMAGE] * 64 + [EOI, 20], max_tokens=2)


def test_photos_as_they_are_shown(tmp_path):
    """EXIF orientation applied (as transformers loads images); 16-bit grey not clipped to white."""
    pair = pair_of(multimodal(tmp_path))
    picture = PILImage.open(IMAGES / "wide.png")
    exif = PILImage.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to show
    picture.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    shown = PILImage.open(tmp_path / "photo.jpg").transpose(PILImage.Transpose.ROTATE_270)
    shown.save(tmp_path / "shown.png")
    photo, expected = mlx_mtp.prepare_images(pair, [tmp_path / "photo.jpg", tmp_path / "shown.png"])
    assert photo.pixels.shape == expected.pixels.shape and np.array_equal(photo.pixels, expected.pixels)
    grey = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20).astype(np.uint16)
    PILImage.fromarray(grey).save(tmp_path / "grey16.png")
    (image,) = mlx_mtp.prepare_images(pair, [tmp_path / "grey16.png"])
    assert abs(image.pixels.mean() - grey.mean() / 65535) < 0.01


def test_image_urls_as_clients_write_them(image_server, tmp_path):
    square = ask(image_server, IMAGES / "square.png").choices[0].message.content
    encoded = base64.encodebytes((IMAGES / "square.png").read_bytes()).decode().rstrip("=\n")  # wrapped, unpadded
    assert ask(image_server, "DATA:image/png;BASE64," + encoded).choices[0].message.content == square
    (image_server.tmp / "served" / "a dir").mkdir(exist_ok=True)
    shutil.copy(IMAGES / "square.png", image_server.tmp / "served" / "a dir" / "sq.png")
    url = f"file://localhost{image_server.tmp / 'served'}/a%20dir/sq.png"
    assert ask(image_server, url).choices[0].message.content == square
    fifo = image_server.tmp / "served" / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    too_many = [{"type": "image_url", "image_url": {"url": "x"}}] * (MAX_IMAGES + 1)
    for content, message in [
        ([{"type": "image_url", "image_url": {"url": "fifo.png"}}], "cannot read fifo.png: not a file"),
        ([{"type": "image_url", "image_url": {"url": "nothere.png"}}], "cannot read nothere.png: no such file"),
        ([{"type": "image_url", "image_url": {"url": "x" * 5000}}], "must be a data URL, an http(s) URL or a file"),
        ([{"type": "image_url", "image_url": {"url": "file://elsewhere/x.png"}}], "must name a local file"),
        (too_many, f"{MAX_IMAGES + 1} images, over the {MAX_IMAGES}"),
    ]:
        r = image_server.post("/v1/chat/completions", {"model": image_server.model, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": content}]})
        error = r.json()["error"]["message"]
        assert r.status_code == 400 and message in error and str(image_server.tmp) not in error, error


def test_the_embeddings_of_an_image_read_again_are_kept(tmp_path, monkeypatch):
    import mlx_mtp.models.vision as vision

    monkeypatch.setattr(vision, "FEATURES_KEPT", 2)
    pair = mlx_mtp.load(str(multimodal(tmp_path)))  # a tower of its own
    square, wide, other = mlx_mtp.prepare_images(pair, FILES + [other_square(tmp_path)])
    tower = pair.target.vision.tower(64, mx.float32)
    first = tower([square])[0]
    assert tower([square])[0] is first  # kept, not computed again
    tower([wide, other])  # past FEATURES_KEPT: the least recently used goes
    assert list(tower.kept) == [wide.digest, other.digest]
    again = tower([square])[0]
    assert again is not first and np.array_equal(np.array(again), np.array(first))
    out = mlx_mtp.generate(pair, PROMPT, images=[square, wide], max_tokens=24, num_draft_tokens=0)
    assert out.tokens == REF["causal_greedy"].tolist()  # read from kept embeddings


def test_images_after_a_prompt_past_the_cache_step_and_the_window(tmp_path):
    """300 text ids first (past the cache's 256-slot step and the sliding window), then both
    images, read in chunks of 64: drafting changes nothing."""
    pair = pair_of(multimodal(tmp_path, "vision"))
    prompt = [BOS] + [13 + i % 400 for i in range(300)] + PROMPT[1:]
    plain = mlx_mtp.generate(pair, prompt, images=FILES, max_tokens=24, num_draft_tokens=0, prefill_step_size=64)
    drafted = mlx_mtp.generate(pair, prompt, images=FILES, max_tokens=24, num_draft_tokens=3, prefill_step_size=64)
    assert drafted.tokens == plain.tokens and len(plain.tokens) == 24
    assert plain.stats.prompt_tokens > 256 + 124


@pytest.mark.parametrize("value", ["NaN", "0", '"many"', "true"])
def test_a_bad_soft_token_budget_in_the_checkpoint_is_a_one_line_error(tmp_path, value):
    path = multimodal(tmp_path)
    (path / "processor_config.json").write_text(f'{{"image_processor": {{"max_soft_tokens": {value}}}}}')
    out = run_cli("generate", "hi", "--target", path, "--image", IMAGES / "square.png")
    assert out.returncode != 0 and "max_soft_tokens must be an integer >= 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
