"""Flag validation across the five scripts (issue 21): a bad value, an unknown choice or an impossible combination
is a usage error BEFORE any work: exit status 2, ONE `error:` line naming the flag and its value, no traceback.
Run in-process through common.run (what `python SCRIPT ...` runs, minus the interpreter start); the output
directory named is never created, which shows that nothing ran."""
import importlib

import pytest

import common

BAD = [  # (script, argv, words the line must hold)
    ("excb", ["--backbone", "resnet34"], ["--backbone", "resnet34", "resnet18"]),
    ("excb", ["--dataset", "cifar11"], ["--dataset", "cifar11", "cifar10"]),
    ("excb", ["--save-every", "0"], ["--save-every", "0"]),
    ("excb", ["--epochs", "-1"], ["--epochs", "-1"]),
    ("excb", ["--workers", "-1"], ["--workers", "-1"]),
    ("excb", ["--lr", "nan"], ["--lr", "nan"]),
    ("excb", ["--optimizer", "adam"], ["--optimizer", "adam", "adamw"]),
    ("excb", ["--num-clusters", "1"], ["--num-clusters", "1"]),
    ("excb", ["--preset", "imagenet22k"], ["--preset", "imagenet22k", "imagenet"]),
    ("excb", ["--head-style", "deit"], ["--head-style", "deit"]),
    ("excb", ["--schedule-offset", "2"], ["--schedule-offset", "2"]),
    ("excb", ["--blur-p", "0", "1.5", "0"], ["--blur-p", "1.5"]),
    ("resa", ["--optimizer", "lamb"], ["--optimizer", "lamb"]),
    ("resa", ["--dataset", "mnist"], ["--dataset", "mnist"]),
    ("simclr_nscl", ["--crop-scale", "0.08", "0"], ["--crop-scale", "0"]),
    ("simclr_nscl", ["--epochs", "-1"], ["--epochs", "-1"]),
    ("resa", ["--precision", "fp8"], ["--precision", "fp8", "bf16"]),
    ("resa", ["--data-path", "gpu"], ["--data-path", "gpu", "device"]),
    ("resa", ["--temperature", "0"], ["--temperature", "0"]),
    ("resa", ["--batch-size", "0"], ["--batch-size", "0"]),
    ("simclr_nscl", ["--loss", "triplet"], ["--loss", "triplet", "nscl"]),
    ("simclr_nscl", ["--jitter-p", "1.5"], ["--jitter-p", "1.5"]),
    ("simclr_nscl", ["--epochs", "ten"], ["--epochs", "ten"]),
    ("probe", ["RUN", "--max-train", "-5"], ["--max-train", "-5"]),
    ("probe", ["RUN", "--features", "encoder"], ["--features", "encoder", "backbone"]),
    ("probe", ["RUN", "--probes", "knn,svm"], ["--probes", "svm"]),
    ("probe", ["RUN", "--shots", "0"], ["--shots", "0"]),
    ("monitor", ["RUN", "--n-clusters", "1"], ["--n-clusters", "1"]),
    ("monitor", ["RUN", "--features", "encoder"], ["--features", "encoder"]),
    ("monitor", ["RUN", "--probe", "ridge"], ["--probe", "ridge"]),
]


@pytest.mark.parametrize("script, argv, words", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_a_bad_flag_is_one_usage_line_before_any_work(script, argv, words, tmp_path, capsys):
    mod = importlib.import_module(script)
    out_flag = "--out-dir" if script in ("probe", "monitor") else "--output-dir"
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv] + [out_flag, str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        common.run(lambda: mod.main(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()  # nothing was written: the check came first


def test_probe_device_cuda_without_cuda_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import probe
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        common.run(lambda: probe.main([str(tmp_path), "--device", "cuda"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "--device" in lines[0] and "cuda" in lines[0], lines
