"""`scaling-compile generate`: the embedded default and a pipeline folder the test saves itself, on the CPU."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from scaling_compile import generate
from scaling_compile.cli import main

from profiled import chunked_path  # noqa: F401  (fixture: the CPU path a user gets, without the Triton interpreter)

# Small, fast settings: 2 steps; the profile latent 3 16 16 is 3 x 8 x 8 tokens = 3 blocks of 64.
FAST = ["--steps", "2", "--latent", "3", "16", "16", "--profile-latent", "3", "16", "16", "--device", "cpu"]


def tiny_text_pipeline():
    """A tiny ``WanPipeline`` with a real (random) UMT5 text encoder and a word-level tokenizer built here."""
    from diffusers import WanTransformer3DModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from scaling_compile.quality import tiny_vae, wan_pipeline

    words = ["<pad>", "</s>", "<unk>", "a", "fox", "in", "the", "snow", "red", "cat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    pipe = wan_pipeline(transformer, tiny_vae())
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder)
    return pipe


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan-pipeline")
    tiny_text_pipeline().save_pretrained(folder)
    return folder


def _frames(folder):
    names = sorted(os.listdir(folder / "frames"))
    assert names and names[0] == "frame_0000.png"
    for name in names:
        assert (folder / "frames" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return names


def test_generate_on_a_saved_pipeline_folder(pipeline_folder, tmp_path, capsys, chunked_path):  # noqa: F811
    out = tmp_path / "video"
    code = main(["generate", str(pipeline_folder), "--out", str(out), "--prompt", "a red fox in the snow",
                 "--guidance-scale", "1.0", "--block-size", "16", *FAST, "--compare"])
    assert code == 0
    text = capsys.readouterr().out
    assert "prompt 'a red fox in the snow'" in text
    assert len(_frames(out)) == 5  # latent frames 3 -> (3 - 1) * 2 + 1 video frames (the tiny VAE's 2x)
    assert os.path.exists(out / "profiled.safetensors")
    assert "dense:" in text and "sparse:" in text and "PSNR" in text
    if not generate.mp4_available():
        assert "no mp4: imageio-ffmpeg is not installed" in text
    else:
        assert (out / "video.mp4").stat().st_size > 0


def test_generate_on_the_embedded_default(tmp_path, capsys, chunked_path):  # noqa: F811
    out = tmp_path / "default"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "--out", str(out), "--format", "png", "--block-size", "16", *FAST]) == 0
    dense_at_run_time = [str(w.message) for w in caught if "stays dense" in str(w.message)]
    assert not dense_at_run_time  # every step served, the first (the one that compiles the blocks) too
    captured = capsys.readouterr()
    assert "embedded default" in captured.out and "seeded random prompt embeddings" in captured.out
    assert "SDPA nodes sparse" in captured.err  # the backend's summary: attention was served sparse
    names = _frames(out)
    assert len(names) == 5
    from PIL import Image

    with Image.open(out / "frames" / names[0]) as frame:
        assert frame.size == (64, 64)  # latent 16 x 16, the embedded VAE's 4x
    assert not os.path.exists(out / "video.mp4")


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "is not in (0, 1]"),
    (["--latent", "3", "15", "16"], "height 15 is not a multiple of 2"),
    (["--latent", "3", "2", "2"], "pixels; the pipeline needs a multiple of 16"),
    (["--profile-latent", "1", "2", "2"], "--profile-latent gives 1 tokens"),
    (["--artifact", "missing.safetensors"], "does not exist"),
    (["--device", "tpu"], "use cpu, cuda, cuda:N or auto"),
    (["--steps", "0"], "is not a positive integer"),
    (["--format", "gif"], "invalid choice"),
    (["no-such-folder"], "is not a folder"),
])
def test_generate_refuses_bad_arguments_in_one_line(argv, message, tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")  # nothing was started


def test_generate_refuses_a_folder_without_a_pipeline(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "has no model_index.json" in capsys.readouterr().err


@pytest.mark.skipif(generate.mp4_available(), reason="imageio-ffmpeg is installed here")
def test_mp4_without_imageio_ffmpeg_says_what_to_install(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x"), "--format", "mp4"]) == 2
    assert "pip install imageio-ffmpeg" in capsys.readouterr().err


def test_write_mp4_when_imageio_ffmpeg_is_installed(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import numpy as np

    frames = (np.random.default_rng(0).random((5, 33, 48, 3)) * 255).astype(np.uint8)  # odd height: padded
    path = generate.write_mp4(frames, str(tmp_path / "v.mp4"), fps=8)
    assert os.path.getsize(path) > 0
