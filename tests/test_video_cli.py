"""``diffusers-ext video {generate,i2v,interpolate,extend}`` and the video part of the demo, on tiny random
``FrameAwareVideoPipeline`` folders: bad options are one-line errors found before torch is imported, and write
nothing; each task writes the frames the pipeline makes for the same seed, with the given frames as they were given;
the checks the command makes from a model's files agree with the loaded pipeline."""

import importlib.util
import inspect
import json
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import PIL.ImageSequence
import pytest
import torch
from diffusers import AutoencoderKLWan, CogVideoXTransformer3DModel
from tiny_video import wan

from diffusers_ext.cli import (
    PIPELINE_CONTEXT_FRAMES,
    PIPELINE_NUM_FRAMES,
    PIPELINE_SAMPLE_SIZE,
    main,
    video_model,
)
from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.video import FrameAwareVideoPipeline
from diffusers_ext.pipelines.video.demo import make_video, run_video_demo, window_count, write_video
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.training.fvdm import BouncingShapes, toy_backbone

HAS_FFMPEG = all(importlib.util.find_spec(module) for module in ("imageio", "imageio_ffmpeg"))
CLIP_FRAMES, CONTEXT_FRAMES, SIZE = 8, 2, 16


def tiny_pipeline() -> FrameAwareVideoPipeline:
    """The toy Wan of ``training/fvdm.py`` (random weights) on 8 frames of 16 x 16 RGB pixels."""
    pipe = FrameAwareVideoPipeline(toy_backbone(seed=0).eval(), FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixel_model(tmp_path_factory):
    """``tiny_pipeline`` as ``save_for_hub`` lays it out, with a training report that gives its window and context
    the way the shipped model's does."""
    folder = save_for_hub(tiny_pipeline(), tmp_path_factory.mktemp("pixel") / "model")
    report = {"clip": {"num_frames": CLIP_FRAMES, "size": SIZE, "context_frames": CONTEXT_FRAMES}}
    (folder / "training_report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture(scope="module")
def vae_model(tmp_path_factory):
    """A tiny Wan transformer with a tiny Wan VAE (temporal compression 4, spatial 8)."""
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    pipe = FrameAwareVideoPipeline(wan(), FrameAwareFlowMatchScheduler(), vae=vae.eval())
    return save_for_hub(pipe, tmp_path_factory.mktemp("vae") / "model")


def clip_frames(count: int, seed: int = 3, size: int = SIZE) -> list[PIL.Image.Image]:
    """``count`` frames of a held-out ``BouncingShapes`` clip (a few flat colours: GIFs keep them exactly)."""
    clip = BouncingShapes(1, num_frames=count, size=size, seed=seed)[0]
    pixels = ((clip + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return [PIL.Image.fromarray(frame) for frame in pixels]


def read_gif(path) -> np.ndarray:
    with PIL.Image.open(path) as gif:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in PIL.ImageSequence.Iterator(gif)])


def as_uint8(frames: np.ndarray) -> np.ndarray:
    return (frames * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pixel_model):
    folder = tmp_path_factory.mktemp("inputs")
    frames = clip_frames(6)
    for index in (0, 3, 5):
        frames[index].save(folder / f"frame{index}.png")
    frames[0].resize((32, 32)).save(folder / "big.png")
    (folder / "notes.txt").write_text("not an image")
    frames[0].save(folder / "video.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    frames[0].resize((32, 32)).save(folder / "big.gif", save_all=True,
                                    append_images=[f.resize((32, 32)) for f in frames[1:]])
    frames[0].save(folder / "one.gif")
    not_video = folder / "index"
    not_video.mkdir()
    (not_video / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return folder


CHECK_ALL = """
import contextlib, io, json, sys
from diffusers_ext.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    error = io.StringIO()
    with contextlib.redirect_stderr(error):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
    results.append([code, error.getvalue()])
print(json.dumps({"results": results, "torch imported": "torch" in sys.modules}))
"""


def assert_clear_errors_before_torch(cases: list[tuple[list[str], str]]) -> None:
    """Runs each ``(argv, message)`` of ``cases`` through ``diffusers-ext`` in one fresh Python: each must exit with
    code 2 and ``message`` on stderr, in one line (argparse's own errors print their usage above), with no traceback,
    and torch must never have been imported."""
    argvs = [argv for argv, _ in cases]
    result = subprocess.run([sys.executable, "-c", CHECK_ALL, json.dumps(argvs)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torch imported"] is False
    for (argv, message), (code, stderr) in zip(cases, report["results"], strict=True):
        assert code == 2, (argv, stderr)
        assert "Traceback" not in stderr and message in stderr, (argv, stderr)
        if "positive integer" not in message:  # argparse prints its usage above its error
            assert len(stderr.strip().splitlines()) == 1, stderr


def test_bad_options_are_one_line_errors_before_torch_is_imported_and_write_nothing(tmp_path, inputs, pixel_model,
                                                                                    vae_model):
    out = str(tmp_path / "out.gif")
    pixel = ["--model", str(pixel_model), "--trust-remote-code", "--output", out]
    vae = ["--model", str(vae_model), "--trust-remote-code", "--output", out]
    i = lambda name: str(inputs / name)  # noqa: E731
    cases = [
        (["generate", *pixel[:-1], str(tmp_path / "out.png")], "write a .gif or an .mp4"),
        (["generate", "--model", str(pixel_model), "--output", out], "pass --trust-remote-code"),
        (["generate", "--model", str(inputs / "index"), "--output", out], "holds a WanPipeline, not a Frame"),
        (["generate", "--model", str(inputs), "--output", out], "no model_index.json"),
        (["generate", *pixel, "--frames", "16", "--context-frames", "8"],
         "--context-frames must be below the window's 8 latent frames, got 8"),
        (["generate", *vae, "--frames", "9", "--window", "8"], "--window 8: this model's VAE encodes 1 + a multiple"),
        (["i2v", *pixel, "--image", i("missing.png")], "--image"),
        (["i2v", *pixel, "--image", i("notes.txt")], "cannot read it as an image"),
        (["i2v", *pixel, "--image", i("big.png")], "--image is 32x32 pixels (width x height); the model's frames "
                                                   "are 16x16"),
        (["interpolate", *pixel, "--first", i("frame0.png")], "needs --first PATH and --last PATH"),
        (["interpolate", *pixel, "--first", i("frame0.png"), "--last", i("frame5.png"), "--key-frames",
          f"3={i('frame3.png')}"], "either as --first/--last or as --key-frames"),
        (["interpolate", *pixel, "--key-frames", i("frame0.png"), i("frame5.png")], "expected INDEX=PATH"),
        (["interpolate", *pixel, "--key-frames", f"0={i('frame0.png')}", f"8={i('frame5.png')}"],
         "key frame index 8 is outside the 8 frames 0 to 7"),
        (["interpolate", *pixel, "--key-frames", f"0={i('frame0.png')}", f"0={i('frame5.png')}"],
         "two key frames at frame 0"),
        (["interpolate", *pixel, "--key-frames", f"0={i('frame0.png')}"], "at least two key frames"),
        (["interpolate", *pixel, "--first", i("frame0.png"), "--last", i("big.png")], "--last is 32x32"),
        (["interpolate", *pixel, "--first", i("frame0.png"), "--last", i("frame5.png"), "--frames", "9"],
         "interpolate makes at most 8 frames"),
        (["extend", *pixel, "--video", i("missing.gif")], "--video"),
        (["extend", *pixel, "--video", i("frame0.png")], "read videos are .gif or .mp4"),
        (["extend", *pixel, "--video", i("video.gif"), "--frames", "6"], "--frames 6 must exceed the 6 frames"),
        (["extend", *pixel, "--video", i("one.gif")], "has 1 frames; extending it takes its last 2"),
        (["extend", *pixel, "--video", i("big.gif")], "frame 0 of --video"),
        (["generate", *vae, "--frames", "8"], "encodes 1 + a multiple of 4 frames (e.g. --frames 5 or 9)"),
        (["interpolate", *vae, "--first", i("frame0.png"), "--last", i("frame5.png"), "--frames", "5"],
         "only the first frame can be given"),
        (["extend", *vae, "--video", i("video.gif"), "--frames", "9"], "adds a multiple of 4"),
        (["i2v", *vae, "--image", i("frame0.png")], "the model's frames are 128x128"),
        (["generate", *pixel, "--steps", "0"], "must be a positive integer"),
        (["generate", *pixel, "--frames", "-3"], "must be a positive integer"),
    ]
    if not HAS_FFMPEG:
        cases.append((["generate", *pixel[:-1], str(tmp_path / "out.mp4")], "needs imageio and imageio-ffmpeg"))
    assert_clear_errors_before_torch([(["video", *arguments], message) for arguments, message in cases])
    assert list(tmp_path.iterdir()) == []


def test_the_checks_made_from_a_models_files_agree_with_the_loaded_pipeline(pixel_model, vae_model):
    defaults = inspect.signature(FrameAwareVideoPipeline.__call__).parameters
    assert defaults["num_frames"].default == PIPELINE_NUM_FRAMES
    assert defaults["context_frames"].default == PIPELINE_CONTEXT_FRAMES
    for folder, frames in ((pixel_model, CLIP_FRAMES), (vae_model, None)):  # the report's, or None
        model = video_model(str(folder), trust_remote_code=True)
        pipe = FrameAwareVideoPipeline.from_pretrained(folder, trust_remote_code=True)
        assert model.frame_size == pipe._frame_size(None, None)
        assert model.temporal_compression == pipe.temporal_compression
        assert model.clip_frames == frames
    assert video_model(str(vae_model), True).frame_size == (PIPELINE_SAMPLE_SIZE * 8,) * 2


def run(*arguments, capsys) -> tuple[int, str, str]:
    code = main(["video", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_the_pipelines_frames_for_the_seed_rolling_the_models_window(tmp_path, pixel_model, capsys):
    out = tmp_path / "deep" / "clip.gif"
    code, stdout, stderr = run("generate", "--model", str(pixel_model), "--trust-remote-code", "--output", str(out),
                               "--steps", "2", "--frames", "16", "--seed", "5", capsys=capsys)
    assert code == 0, stderr
    assert f"wrote {out}: 16 frames of 16x16 pixels" in stdout
    windows = window_count(16, CLIP_FRAMES, CONTEXT_FRAMES)
    assert windows == 3 and f"{2 * windows}/{2 * windows}" in stderr  # one progress bar over every window's steps
    expected = tiny_pipeline()(num_frames=16, num_inference_steps=2, window_frames=CLIP_FRAMES,
                               context_frames=CONTEXT_FRAMES, generator=torch.Generator().manual_seed(5)).frames[0]
    np.testing.assert_array_equal(read_gif(out), as_uint8(expected))
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.gif"]  # no temporary file left


def test_i2v_and_interpolate_keep_the_given_frames_and_make_the_pipelines_frames(tmp_path, pixel_model, inputs,
                                                                                 capsys):
    model = ["--model", str(pixel_model), "--trust-remote-code", "--steps", "2"]
    frames = {index: PIL.Image.open(inputs / f"frame{index}.png").convert("RGB") for index in (0, 3, 5)}
    runs = {
        "i2v": (["--image", str(inputs / "frame0.png")], 8, {0: frames[0]}),
        "interpolate": (["--first", str(inputs / "frame0.png"), "--last", str(inputs / "frame5.png"), "--frames",
                         "6"], 6, {0: frames[0], 5: frames[5]}),
        "key-frames": (["--key-frames", f"0={inputs / 'frame0.png'}", f"3={inputs / 'frame3.png'}",
                        f"7={inputs / 'frame5.png'}"], 8, {0: frames[0], 3: frames[3], 7: frames[5]}),
    }
    for name, (arguments, num_frames, given) in runs.items():
        out = tmp_path / f"{name}.gif"
        task = "i2v" if name == "i2v" else "interpolate"
        code, _, stderr = run(task, *model, *arguments, "--output", str(out), capsys=capsys)
        assert code == 0, stderr
        written = read_gif(out)
        assert len(written) == num_frames
        for index, image in given.items():
            np.testing.assert_array_equal(written[index], np.asarray(image))
        expected = tiny_pipeline()(num_frames=num_frames, num_inference_steps=2, conditioning_frames=given,
                                   generator=torch.Generator().manual_seed(0)).frames[0]
        np.testing.assert_array_equal(written, as_uint8(expected))


def test_extend_continues_the_video_from_its_last_frames(tmp_path, pixel_model, inputs, capsys):
    out = tmp_path / "longer.gif"
    code, _, stderr = run("extend", "--model", str(pixel_model), "--trust-remote-code", "--video",
                          str(inputs / "video.gif"), "--frames", "16", "--steps", "2", "--output", str(out),
                          capsys=capsys)
    assert code == 0, stderr
    written, video = read_gif(out), clip_frames(6)
    assert len(written) == 16
    np.testing.assert_array_equal(written[:6], np.stack([np.asarray(frame) for frame in video]))
    # The model continues from the video's last CONTEXT_FRAMES frames, given clean, over 2 + 10 frames.
    expected = tiny_pipeline()(num_frames=CONTEXT_FRAMES + 10, num_inference_steps=2,
                               conditioning_frames=dict(enumerate(video[-CONTEXT_FRAMES:])), window_frames=CLIP_FRAMES,
                               context_frames=CONTEXT_FRAMES, generator=torch.Generator().manual_seed(0)).frames[0]
    np.testing.assert_array_equal(written[6:], as_uint8(expected[CONTEXT_FRAMES:]))


def test_extend_through_a_vae_that_packs_frames_continues_from_the_last_frame(tmp_path, vae_model, capsys):
    """Wan's VAE encodes the first frame alone and 4 after it into each latent frame: the video's last frame alone
    is given (as frame 0), and the extension adds a multiple of 4 frames."""
    video = clip_frames(5, size=128)
    video[0].save(tmp_path / "video.gif", save_all=True, append_images=video[1:])
    out = tmp_path / "longer.gif"
    code, stdout, stderr = run("extend", "--model", str(vae_model), "--trust-remote-code", "--video",
                               str(tmp_path / "video.gif"), "--frames", "9", "--steps", "1", "--output", str(out),
                               capsys=capsys)
    assert code == 0, stderr
    assert "9 frames of 128x128 pixels" in stdout
    written = read_gif(out)
    np.testing.assert_array_equal(written[:5], np.stack([np.asarray(frame) for frame in video]))
    pipe = FrameAwareVideoPipeline.from_pretrained(vae_model, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(num_frames=5, num_inference_steps=1, conditioning_frames={0: video[-1]},
                    generator=torch.Generator().manual_seed(0)).frames[0]
    # (A GIF keeps 256 colours a frame, too few for these 128 x 128 frames to compare the file's exactly.)
    np.testing.assert_array_equal(make_video(pipe, 9, video=video, num_inference_steps=1)[5:], expected[1:])


def test_a_model_the_pipeline_refuses_on_loading_is_a_one_line_error_and_writes_nothing(tmp_path, pixel_model,
                                                                                      capsys):
    """An unsupported backbone passes the file checks (its folder looks like a video pipeline's) and is refused when
    the pipeline is built."""
    folder = tmp_path / "cogvideox"
    shutil.copytree(pixel_model, folder)
    shutil.rmtree(folder / "transformer")
    CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=3,
                                num_layers=1, text_embed_dim=16, time_embed_dim=8, sample_width=16, sample_height=16,
                                sample_frames=8).save_pretrained(folder / "transformer")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"transformer": ["diffusers",
                                                                                  "CogVideoXTransformer3DModel"]}))
    out = tmp_path / "out.gif"
    code, _, stderr = run("generate", "--model", str(folder), "--trust-remote-code", "--output", str(out),
                          capsys=capsys)
    assert code == 2 and "Traceback" not in stderr
    assert "CogVideoXTransformer3DModel" in stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_write_video_writes_gifs_exactly_and_mp4_with_ffmpeg(tmp_path):
    frames = np.stack([np.asarray(frame) for frame in clip_frames(5)]) / 255
    write_video(frames, tmp_path / "a.gif", fps=4)
    np.testing.assert_array_equal(read_gif(tmp_path / "a.gif"), as_uint8(frames))
    with PIL.Image.open(tmp_path / "a.gif") as gif:
        assert gif.info["duration"] == 250
    if not HAS_FFMPEG:  # the command refuses .mp4 before any work (the test of bad options)
        return
    import imageio.v2

    write_video(frames, tmp_path / "a.mp4", fps=4)
    back = np.stack(imageio.v2.mimread(tmp_path / "a.mp4", format="FFMPEG"))
    assert back.shape == (5, SIZE, SIZE, 3) and np.abs(back / 255 - frames).mean() < 0.1  # lossy


def test_make_video_counts_every_window_in_its_progress_bar(capsys):
    pipe = tiny_pipeline()
    make_video(pipe, num_frames=20, clip_frames=CLIP_FRAMES, num_inference_steps=3, context_frames=4, progress=True)
    windows = window_count(20, CLIP_FRAMES, 4)
    assert windows == 4 and f"{3 * windows}/{3 * windows}" in capsys.readouterr().err


def test_video_demo_writes_each_task_next_to_held_out_clips_and_its_figures(tmp_path, capsys):
    from diffusers_ext.training.recipes import tiny_fvdm_shapes as recipe

    scores = run_video_demo(tmp_path, num_clips=3, num_long_clips=2, num_reference_clips=4, num_inference_steps=1,
                            pipe=tiny_pipeline(), shown=2)
    long_frames = recipe.LONG_VIDEO_WINDOWS * recipe.NUM_FRAMES
    for task, frames in (("generation", 8), ("image_to_video", 8), ("interpolation", 8), ("long_video", long_frames)):
        with PIL.Image.open(tmp_path / f"{task}.gif") as gif:
            assert gif.n_frames == frames
    text = (tmp_path / "video.txt").read_text()
    for row in scores:
        assert row in text
    assert scores["held-out clips (floor)"]["clean_fraction"] == 1.0
    assert "mean squared error to the held-out frames" in text and text in capsys.readouterr().out
