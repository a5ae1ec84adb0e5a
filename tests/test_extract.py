"""Extraction at scale on corpora built here: every input accounted for once, bad files reported
not fatal, image conversions, resume after SIGKILL, torchrun and Ray giving the same embeddings."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import backbone_sdk as bs
from _frameworks import require
from backbone_sdk.cli import main
from backbone_sdk.extraction import ExtractionError, ExtractionSettings, run, verify
from backbone_sdk.imageio import DecodeError, decode_image

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ExtractionSettings(backbone="resnet_test", size=32, batch_size=16, shard_size=50, workers=0, threads=1)


def _image(i: int, size=(12, 16)) -> np.ndarray:
    gen = np.random.default_rng(i)
    return gen.integers(0, 256, (*size, 3), dtype=np.uint8)


def make_corpus(root: Path, count: int, bad: bool = True) -> dict[str, str]:
    """``count`` tiny PNG/JPEG images in nested folders, plus one file of each bad kind; returns the
    expected status of every bad key."""
    for i in range(count):
        folder = root / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 2 else ".JPG"  # extensions match case-insensitively
        Image.fromarray(_image(i)).save(folder / f"img{i:05d}{ext}", format="PNG" if i % 2 else "JPEG")
    if not bad:
        return {}
    good = io.BytesIO()
    Image.fromarray(_image(0, (64, 64))).save(good, format="JPEG")
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    (root / "bad" / "text.jpg").write_text("not an image at all")
    Image.new("L", (400, 400)).save(root / "bad" / "bomb.png")
    os.symlink(root / "missing.png", root / "bad" / "dangling.png")
    return {"bad/empty.png": "empty", "bad/truncated.jpg": "truncated", "bad/text.jpg": "not_an_image",
            "bad/bomb.png": "decompression_bomb", "bad/dangling.png": "unreadable"}


def _meta(out: Path) -> dict[str, list]:
    return bs.read_extraction(out).meta.to_pydict()


# -- accounting and failures -----------------------------------------------------------------------------
def test_every_input_is_accounted_for_once_and_bad_files_are_rows(tmp_path):
    expected_bad = make_corpus(tmp_path / "in", 120)
    out = tmp_path / "out"
    settings = ExtractionSettings(backbone="resnet_test", size=32, batch_size=16, shard_size=50, workers=0, threads=1,
                                  max_pixels=100_000)
    summary = run([tmp_path / "in"], out, settings)
    assert verify(out) == []
    ex = bs.read_extraction(out)
    meta = ex.meta.to_pydict()
    assert sorted(meta["index"]) == list(range(125)) and len(set(meta["key"])) == 125
    status = dict(zip(meta["key"], meta["status"]))
    assert {k: status[k] for k in expected_bad} == expected_bad
    assert summary["ok"] == 120 and sum(summary["failed"].values()) == 5
    errors = dict(zip(meta["key"], meta["error"]))
    assert "0 bytes" in errors["bad/empty.png"] and "exceeds the limit" in errors["bad/bomb.png"]
    assert sum(s.shape[0] for s in ex.shards) == 120 and isinstance(ex.shards[0], np.memmap)
    assert ex.shards[0].dtype == np.float16 and ex.info["embed_dim"] == 128
    assert all(meta["emb_row"][i] is None for i, s in enumerate(meta["status"]) if s != "ok")


def test_embeddings_equal_the_model_on_preprocessed_images(tmp_path):
    make_corpus(tmp_path / "in", 20, bad=False)
    out = tmp_path / "out"
    run([tmp_path / "in"], out, ExtractionSettings(backbone="resnet_test", size=32, store="fp32", shard_size=8,
                                                   workers=1, threads=1))
    ex = bs.read_extraction(out)
    torch.manual_seed(0)
    model = bs.create_backbone("resnet_test").eval()
    paths = ex.meta.column("path").to_pylist()
    with torch.inference_mode():
        expected = model.embed(bs.preprocess([bs.load_image(p) for p in paths], model.spec, size=32)).numpy()
    np.testing.assert_allclose(ex.embeddings, expected, rtol=0, atol=1e-5)
    assert ex.info["weights"] == "random" and ex.info["preprocessing"]["size"] == [32, 32]


def test_too_many_failures_stop_the_run(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(60):
        (tmp_path / "in" / f"{i}.png").write_text("junk")
    with pytest.raises(ExtractionError, match="--max-failure-rate"):
        run([tmp_path / "in"], tmp_path / "out", SETTINGS)


def test_normalize_and_maps(tmp_path):
    make_corpus(tmp_path / "in", 10, bad=False)
    out = tmp_path / "out"
    run([tmp_path / "in"], out, ExtractionSettings(backbone="resnet_test", size=32, normalize=True, maps="pyramid",
                                                   workers=0))
    emb = bs.read_extraction(out).embeddings.astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    from safetensors.numpy import load_file

    maps = load_file(str(out / "maps" / "part-00000.safetensors"))
    assert maps["p5"].shape == (10, 128, 1, 1) and maps["p2"].shape == (10, 16, 8, 8)


# -- inputs ------------------------------------------------------------------------------------------------
def test_file_lists_and_tar_shards_with_captions(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(_image(i)).save(imgs / f"{i}.png")
    (tmp_path / "list.txt").write_text("imgs/0.png\nimgs/1.png\n")
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["path", "caption"], ["imgs/2.png", "a red square"], ["imgs/3.png", ""]])
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:05d}.tar", "w") as tar:
            for j in range(3):
                buf = io.BytesIO()
                Image.fromarray(_image(10 + shard * 3 + j)).save(buf, format="JPEG")
                for name, data in ((f"s{j}.jpg", buf.getvalue()), (f"s{j}.txt", f"caption {shard}-{j}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run([tmp_path / "list.txt", tmp_path / "list.csv", str(tmp_path / "shard-{00000..00001}.tar")], out, SETTINGS)
    meta = _meta(out)
    assert meta["status"] == ["ok"] * 10
    assert meta["key"][:4] == ["imgs/0.png", "imgs/1.png", "imgs/2.png", "imgs/3.png"]
    assert meta["caption"][2:5] == ["a red square", None, "caption 0-0"] and meta["caption"][-1] == "caption 1-2"
    assert meta["key"][4] == "shard-00000.tar/s0.jpg" and meta["width"][4] == 16


# -- image conversions -------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_image(1, (20, 40))).save(path, exif=exif)
    decoded = decode_image(str(path))
    assert decoded.array.shape == (40, 20, 3) and (decoded.width, decoded.height) == (20, 40)
    assert bs.load_image(path).shape == (40, 20, 3)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 257 * 64, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert decode_image(str(path)).array[0, :, 0].tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (8, 6)).save(path)
    assert decode_image(str(path)).array.shape == (6, 8, 3)


def test_first_frame_of_an_animation(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(str(tmp_path / "a.gif")).array[0, 0]) == (254, 0, 0) or \
        decode_image(str(tmp_path / "a.gif")).array[0, 0, 0] > 200


def test_extreme_aspect_ratio_is_bounded(tmp_path):
    Image.fromarray(np.zeros((1, 2000, 3), np.uint8)).save(tmp_path / "line.png")
    spec = bs.get_spec("resnet18")
    start = time.perf_counter()
    batch = bs.preprocess(bs.load_image(tmp_path / "line.png"), spec)
    assert batch.shape == (1, 3, 224, 224) and time.perf_counter() - start < 5
    ordinary = _image(3, (300, 400))
    full = bs.preprocess(ordinary, spec)  # ordinary images keep the exact resize-then-crop result
    assert full.shape == (1, 3, 224, 224)


def test_decode_failures_have_kinds(tmp_path):
    with pytest.raises(DecodeError) as info:
        decode_image(b"")
    assert info.value.kind == "empty"
    with pytest.raises(DecodeError) as info:
        decode_image(b"GIF89a-not-really")
    assert info.value.kind == "not_an_image"


# -- resume, overwrite -------------------------------------------------------------------------------------
def test_rerun_skips_done_shards_and_redoes_partial_ones(tmp_path):
    make_corpus(tmp_path / "in", 120, bad=False)
    out = tmp_path / "out"
    run([tmp_path / "in"], out, SETTINGS)
    reference = {p.name: p.read_bytes() for p in (out / "emb").iterdir()}
    (out / "stats" / "part-00001.json").unlink()  # a shard that was being written when the run died
    (out / "emb" / "part-00001.npy").write_bytes(b"garbage")
    done_before = (out / "stats" / "part-00000.json").stat().st_mtime_ns
    run([tmp_path / "in"], out, SETTINGS)
    assert {p.name: p.read_bytes() for p in (out / "emb").iterdir()} == reference
    assert (out / "stats" / "part-00000.json").stat().st_mtime_ns == done_before  # skipped
    assert verify(out) == []


def test_resume_with_other_settings_is_refused(tmp_path):
    make_corpus(tmp_path / "in", 10, bad=False)
    out = tmp_path / "out"
    run([tmp_path / "in"], out, SETTINGS)
    other = ExtractionSettings(backbone="vit_test", size=32, workers=0)
    with pytest.raises(ExtractionError, match="backbone: 'resnet_test' -> 'vit_test'.*--overwrite"):
        run([tmp_path / "in"], out, other)
    run([tmp_path / "in"], out, other, overwrite=True)
    assert bs.read_extraction(out).info["backbone"] == "vit_test"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    with pytest.raises(ExtractionError, match="not an extraction directory"):
        run([tmp_path / "in"], tmp_path / "foreign", SETTINGS)


def test_verify_finds_missing_and_inconsistent_shards(tmp_path):
    make_corpus(tmp_path / "in", 60, bad=False)
    out = tmp_path / "out"
    run([tmp_path / "in"], out, SETTINGS)
    runner = CliRunner()
    ok = runner.invoke(main, ["extract", "verify", str(out)])
    assert ok.exit_code == 0 and "complete and consistent" in ok.output
    np.save(out / "emb" / "part-00000.npy", np.zeros((3, 128), np.float16))
    (out / "stats" / "part-00001.json").unlink()
    bad = runner.invoke(main, ["extract", "verify", str(out)])
    assert bad.exit_code == 1 and "shard 1: not done" in bad.output and "shard 0: 3 embedding rows" in bad.output


def _extract_cmd(inputs, out, *extra):
    return [sys.executable, "-m", "backbone_sdk", "extract", str(inputs), "-o", str(out), "-b", "resnet_test",
            "--size", "32", "--shard-size", "40", "--batch-size", "8", "--workers", "1", "--threads", "1", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_kill_and_rerun_gives_byte_identical_embeddings(tmp_path):
    make_corpus(tmp_path / "in", 400, bad=False)
    reference = tmp_path / "reference"
    subprocess.run(_extract_cmd(tmp_path / "in", reference), check=True, env=_env(), capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_extract_cmd(tmp_path / "in", out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "stats" / "part-00001.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "stats").glob("*.json")))
    assert 0 < done < 10, done
    assert list((out / "locks").glob("*.lock")), "the killed run leaves its claim behind"
    subprocess.run(_extract_cmd(tmp_path / "in", out), check=True, env=_env(), capture_output=True)
    assert verify(out) == []
    for npy in sorted((reference / "emb").iterdir()):
        assert (out / "emb" / npy.name).read_bytes() == npy.read_bytes(), npy.name
    assert sorted(_meta(out)["index"]) == list(range(400))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_survive_a_killed_worker(tmp_path):
    make_corpus(tmp_path / "in", 200, bad=False)
    single = tmp_path / "single"
    subprocess.run(_extract_cmd(tmp_path / "in", single), check=True, env=_env(), capture_output=True)
    out = tmp_path / "torchrun"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                "-m", "backbone_sdk", *_extract_cmd(tmp_path / "in", out)[3:]]
    result = subprocess.run(torchrun, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert verify(out) == []
    np.testing.assert_array_equal(bs.read_extraction(out).embeddings, bs.read_extraction(single).embeddings)
    # a killed worker's claim is retaken by the next run
    victim = subprocess.Popen(_extract_cmd(tmp_path / "in", tmp_path / "again"), env={**_env(), "RANK": "0",
                              "WORLD_SIZE": "2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats, deadline = tmp_path / "again" / "stats", time.time() + 120
    while not (stats.exists() and list(stats.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    subprocess.run(_extract_cmd(tmp_path / "in", tmp_path / "again"), check=True, env=_env(), capture_output=True)
    np.testing.assert_array_equal(bs.read_extraction(tmp_path / "again").embeddings,
                                  bs.read_extraction(single).embeddings)


@pytest.mark.slow
def test_ray_engine_matches_one_process(tmp_path):
    require("ray")
    make_corpus(tmp_path / "in", 120, bad=False)
    single = tmp_path / "single"
    run([tmp_path / "in"], single, SETTINGS)
    from backbone_sdk.extraction.ray_engine import run_on_ray

    summary = run_on_ray([tmp_path / "in"], tmp_path / "ray", SETTINGS, tasks=2)
    assert summary["ok"] == 120 and verify(tmp_path / "ray") == []
    np.testing.assert_array_equal(bs.read_extraction(tmp_path / "ray").embeddings,
                                  bs.read_extraction(single).embeddings)


def test_cli_default_run_prints_where_the_output_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["extract", "-b", "resnet_test", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "output: " in result.output and "read_extraction" in result.output
    info = json.loads((tmp_path / "extraction" / "extraction.json").read_text())
    assert info["backbone"] == "resnet_test" and verify(tmp_path / "extraction") == []


def test_a_hanging_decode_is_bounded_by_the_timeout(tmp_path, monkeypatch):
    import backbone_sdk.imageio as imageio

    def hang(data, max_pixels):
        time.sleep(5)

    monkeypatch.setattr(imageio, "_open", hang)
    start = time.perf_counter()
    with pytest.raises(DecodeError) as info:
        decode_image(b"anything", timeout=0.2)
    assert info.value.kind == "timeout" and time.perf_counter() - start < 2
