"""The embedder: pooling, prompts, padding, images, bad input and the ONNX backend, on the real MiniLM and on tiny random
Qwen2 / Qwen2-VL models built in-process."""

import io

import numpy as np
import pytest
import torch

from genrec.core.config import EmbedderConfig
from genrec.models.embedder import Embedder, EmbedInput, pool
from tests.tiny_backbones import save_tiny_qwen2, save_tiny_qwen2_vl

TEXTS = ["lipstick red matte", "shampoo for dry hair with argan oil, a long description of it", "nail polish",
         "serum"]


def png(size=(100, 70), color=(10, 200, 10), fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def minilm():
    return Embedder(EmbedderConfig(batch_size=3))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = save_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "model")
    return Embedder(EmbedderConfig(backbone=str(path), max_length=256, batch_size=3,
                                   document_instruction="Represent the given item in one word."))


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    path = save_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2vl") / "model")
    return Embedder(EmbedderConfig(backbone=str(path), max_length=256, batch_size=3))


def one_by_one(embedder, inputs, role="query"):
    return np.stack([embedder.encode([x], role)[0] for x in inputs])


def test_pool_matches_a_loop_reference():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # right, left, no padding
    last = pool(hidden, mask, "last")
    mean = pool(hidden, mask, "mean")
    for i in range(3):
        real = mask[i].nonzero()[:, 0]
        assert torch.allclose(last[i], torch.nn.functional.normalize(hidden[i, real[-1]], dim=0))
        assert torch.allclose(mean[i], torch.nn.functional.normalize(hidden[i, real].mean(0), dim=0), atol=1e-6)


@pytest.mark.parametrize("name", ["minilm", "qwen2", "qwen2_vl"])
def test_batched_equals_one_at_a_time_under_left_and_right_padding(name, request):
    e = request.getfixturevalue(name)
    right = e.encode(TEXTS)
    assert right.shape == (len(TEXTS), e.dim)
    assert np.allclose(np.linalg.norm(right, axis=1), 1, atol=1e-5)
    assert np.abs(right - one_by_one(e, TEXTS)).max() < 1e-5
    e.inputs.tok.padding_side = "left"
    try:
        assert np.abs(e.encode(TEXTS) - right).max() < 1e-5
    finally:
        e.inputs.tok.padding_side = "right"


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_takes_the_last_prompt_token(qwen2, side):
    """Against the model run on each unpadded sequence alone: the embedding is the hidden state at its final token,
    the end of the assistant turn's opening (where the 'one word' would be generated)."""
    qwen2.inputs.tok.padding_side = side
    try:
        batch = qwen2.inputs.batch(TEXTS, "query", truncate=False)
        got = qwen2(batch)
    finally:
        qwen2.inputs.tok.padding_side = "right"
    for i in range(len(TEXTS)):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        assert qwen2.inputs.tok.decode(ids).endswith("<|im_start|>assistant\n")
        with torch.no_grad():
            hidden = qwen2.model(input_ids=ids[None]).last_hidden_state[0, -1]
        assert torch.allclose(got[i], torch.nn.functional.normalize(hidden, dim=0), atol=1e-5)


def test_hierarchical_prompt_levels_and_roles(qwen2, minilm):
    text = qwen2.inputs.tok.decode(qwen2.inputs.batch(["serum"], "document", truncate=False)["input_ids"][0])
    assert text.startswith("<|im_start|>system\n" + qwen2.cfg.task)  # level 1: the shared task definition
    assert "serum\nRepresent the given item in one word.<|im_end|>" in text  # level 2 after the input
    q, d = qwen2.encode(["serum"], "query"), qwen2.encode(["serum"], "document")
    assert float((q * d).sum()) < 0.9999  # the roles' instructions differ here, so do their vectors
    assert qwen2.inputs.prompt and not minilm.inputs.prompt  # default: on for causal LMs, off for encoders
    prompted = Embedder(EmbedderConfig(prompt=True))
    plain = prompted.inputs.tok.decode(prompted.inputs.batch(["serum"], "query", False)["input_ids"][0])
    assert plain.startswith("[CLS] " + prompted.cfg.task.lower()[:20]) and plain.endswith("one word. [SEP]")
    assert float((prompted.encode(["serum"]) * minilm.encode(["serum"])).sum()) < 0.99


def test_images_on_a_vlm(qwen2_vl):
    inputs = [EmbedInput("green", png()), EmbedInput(image=png((40, 90), (200, 0, 0), "JPEG")), EmbedInput("green")]
    v = qwen2_vl.encode(inputs)
    assert np.abs(v - one_by_one(qwen2_vl, inputs)).max() < 1e-5
    assert float(v[0] @ v[2]) < 0.9999  # the image changes the embedding of the same text
    batch = qwen2_vl.inputs.batch(inputs[:1], "query", truncate=False)
    grid = batch["image_grid_thw"][0]
    assert int(batch["mm_token_type_ids"].sum()) == int(grid.prod()) // 4  # one pad token per merged 2x2 patch
    text = qwen2_vl.inputs.tok.decode(batch["input_ids"][0])
    assert "Represent the given image in one word." in text and "<|vision_start|><|image_pad|>" in text
    capped = Embedder(qwen2_vl.cfg.model_copy(update={"max_image_pixels": 56 * 56}))
    big = capped.inputs.batch([EmbedInput(image=png((1000, 700)))], "query", truncate=False)
    assert int(big["image_grid_thw"][0].prod()) * 14 * 14 <= 56 * 56 * 1.5


def test_bad_input_names_the_input(minilm, qwen2_vl):
    with pytest.raises(ValueError, match=r"input 1 is empty"):
        minilm.encode(["fine", "   "])
    with pytest.raises(ValueError, match=r"input 2: the text is \d+ tokens, over the limit of 62 .*shorten it"):
        minilm.encode(["fine", "also fine", "word " * 100])
    with pytest.raises(ValueError, match=r"input 0 has an image, but the embedder backbone 'minilm' is text-only"):
        minilm.encode([EmbedInput("text", png())])
    with pytest.raises(ValueError, match=r"input 1: the image could not be decoded .*send PNG or JPEG"):
        qwen2_vl.encode([EmbedInput("ok"), EmbedInput("x", b"\x89PNG not really")])


def test_truncation_cuts_the_text_never_the_prompt(qwen2):
    cfg = qwen2.cfg.model_copy(update={"max_length": 80})
    e = Embedder(cfg)
    long = "lipstick " * 60
    batch = e.inputs.batch([long], "query", truncate=True)
    assert batch["input_ids"].shape[1] == 80
    assert e.inputs.tok.decode(batch["input_ids"][0]).endswith("Represent the given text in one word.<|im_end|>\n"
                                                                 "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="input 0: the text is"):
        e.encode([long])


def test_onnx_backend_matches_torch(minilm, tmp_path):
    from genrec.models.onnx_embedder import OnnxEmbedder, export_onnx

    path = export_onnx(minilm, tmp_path / "embedder.onnx")
    onnx = OnnxEmbedder(minilm.cfg, path)
    texts = TEXTS + ["a much longer text about a moisturiser for dry skin with shea butter and vitamin e " * 2]
    a, b = minilm.encode(texts), onnx.encode(texts)
    assert (a * b).sum(1).min() >= 0.9999
    with pytest.raises(ValueError, match="input 0 is empty"):
        onnx.encode([""])


def test_onnx_export_refuses_decoder_backbones(qwen2, tmp_path):
    from genrec.models.onnx_embedder import export_onnx

    with pytest.raises(ValueError, match="ONNX export covers encoder backbones.*--backend torch"):
        export_onnx(qwen2, tmp_path / "x.onnx")
