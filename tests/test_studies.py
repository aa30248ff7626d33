"""Batch studies on Dask: a LocalCluster of 2 worker processes runs tiny specs (64x64 crops, big blocks).

Resumability, fault tolerance (a worker killed mid-task), failures of a corrupt image,
spec validation, the table, the aggregation, the CLI and the reader.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from napari_pdcr import cli, studies
from napari_pdcr.samples import load_sample
from napari_pdcr.studies import aggregate, tasks
from napari_pdcr.studies.spec import SpecError, load_spec

distributed = pytest.importorskip("distributed")

CROP = {"start": [70, 0], "size": [64, 64]}  # the brain's left edge on the Colin27 slice
FAST = {"block_shape": 16, "n_screen": 1, "n_estimate": 2}  # zero intervention: one draw per block


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


def tiny_spec(output, **changes) -> dict:
    spec = {
        "study": "tiny", "output": str(output),
        "images": [{"sample": "colin27_slice", "crop": CROP}],
        "regions": {"rule": "boundary", "count": 3, "size": 16, "seed": 0},
        "models": [{"name": "unet2d"}, {"name": "segresnet2d"}],
        "methods": [{"name": "region_effects", "settings": dict(FAST)}],
    }
    spec.update(changes)
    return spec


def quiet(progress):
    return None


def test_study_runs_on_two_workers_and_a_second_run_does_no_work(client, tmp_path):
    spec = tiny_spec(tmp_path / "out", metrics={"faithfulness": {"n_steps": 3, "n_random": 1, "fills": ["zero"]}})
    seen = []
    report = studies.run(spec, client=client, progress=seen.append)
    assert report.total == 6 and report.ran == 6 and report.skipped == 0 and not report.failures
    assert seen[-1].done == 6 and seen[-1].total == 6
    table = studies.load(tmp_path / "out")
    assert len(table) == 6 and table["task_id"].is_unique and (table["status"] == "done").all()
    assert set(table["model"]) == {"unet2d", "segresnet2d"}
    assert table["worker"].nunique() == 2, "both worker processes should have run tasks"
    for column in ("locality", "fraction_negative", "model_sha256", "version_torch", "method_s",
                   "deletion auc (zero, dice)", "summary_base_outcome"):
        assert table[column].notna().all(), column
    # each worker process loaded each model at most once (not once per task)
    loads = client.run(lambda: dict(tasks.MODEL_LOADS))
    assert all(count == 1 for counts in loads.values() for count in counts.values()), loads
    assert sum(count for counts in loads.values() for count in counts.values()) <= 4
    # the row of a task is the summary of the explanation stored in its group
    row = table.iloc[0]
    explanation = studies.open_task(tmp_path / "out", row["task_id"])
    assert explanation.base_outcome == pytest.approx(row["summary_base_outcome"])
    assert explanation.extras["image"].shape == (64, 64)
    # Parquet and CSV hold the same table
    import pandas as pd

    csv = pd.read_csv(tmp_path / "out" / "tasks.csv")
    assert list(csv["task_id"]) == list(table["task_id"])
    # a second run of the same spec does no work and keeps the results
    again = studies.run(spec, client=client, progress=quiet)
    assert again.ran == 0 and again.skipped == 6
    assert list(studies.load(tmp_path / "out")["finished"]) == list(table["finished"])
    # a changed setting (a second seed) runs only the new tasks
    more = studies.run({**spec, "seeds": [0, 1]}, client=client, progress=quiet)
    assert more.total == 12 and more.skipped == 6 and more.ran == 6
    # per-model profile: the mean locality across regions is the mean of the table's rows
    profiles = pd.read_csv(tmp_path / "out" / "profiles.csv")
    for model, group in studies.load(tmp_path / "out").groupby("model"):
        mean = profiles.loc[profiles["model"] == model, "locality_mean"].item()
        assert mean == pytest.approx(group["locality"].mean())
    assert (tmp_path / "out" / "models.png").stat().st_size > 10_000


def test_killed_worker_mid_task_loses_nothing_and_records_each_task_once(client, tmp_path):
    # slower tasks (noise draws on 8-pixel blocks) so that the kill lands inside one
    slow = {"block_shape": 8, "n_screen": 2, "n_estimate": 12, "intervention": "noise"}
    spec = tiny_spec(tmp_path / "out", models=[{"name": "unet2d"}],
                     regions={"rule": "boundary", "count": 6, "size": 16, "seed": 1},
                     methods=[{"name": "region_effects", "settings": slow}])
    pids = client.run(os.getpid)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(report=studies.run(spec, client=client, progress=quiet)))
    runner.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        for address, keys in client.processing().items():
            if keys and any(k.startswith("pdcr-study-") for k in keys) and len(os.listdir(
                    tmp_path / "out" / "study.zarr" / "tasks")) >= 1:
                killed = (address, next(iter(keys)))
                os.kill(pids[address], signal.SIGKILL)
                break
        time.sleep(0.05)
    runner.join(timeout=120)
    assert killed is not None, "no task was seen running"
    report = outcome["report"]
    assert report.ran == report.total == 6 and not report.failures
    table = studies.load(tmp_path / "out")
    assert len(table) == 6 and table["task_id"].is_unique and (table["status"] == "done").all()
    killed_id = killed[1].removeprefix("pdcr-study-")
    if killed_id in set(table["task_id"]):  # the killed task ran again on a live worker
        assert table.set_index("task_id").loc[killed_id, "worker"] != killed[0]
    groups = sorted(os.listdir(tmp_path / "out" / "study.zarr" / "tasks"))
    assert sorted(g for g in groups if g != "zarr.json") == sorted(table["task_id"]), "a leftover or extra group"
    client.wait_for_workers(2, timeout=60)


def test_corrupt_image_fails_its_tasks_with_the_message_and_the_rest_completes(client, tmp_path):
    sample = load_sample("colin27_slice")
    image = sample["image"][70:134, :64]
    mask = sample["mask"][70:134, :64]
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "images" / "good.npy", image)
    (tmp_path / "images" / "bad.npy").write_bytes(b"not an array at all")
    for name in ("good", "bad"):
        np.save(tmp_path / "masks" / f"{name}.npy", mask)
    spec = tiny_spec(tmp_path / "out", models=[{"name": "shallow2d"}],
                     images=[{"glob": str(tmp_path / "images" / "*.npy"), "mask": "../masks/{stem}.npy"}])
    report = studies.run(spec, client=client, progress=quiet)
    assert report.total == 6 and report.ran == 3 and len(report.failures) == 3
    assert all("bad.npy is not a NumPy" in f["error"] and "/ bad /" in f["label"] for f in report.failures)
    table = studies.load(tmp_path / "out")
    assert len(table) == 6
    assert (table.loc[table["image"] == "good", "status"] == "done").all()
    failed = table[table["image"] == "bad"]
    assert (failed["status"] == "failed").all() and failed["error"].str.contains("not a NumPy").all()
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["failed"] == 3 and "not a NumPy" in written["failures"][0]["error"]


def test_study_command_on_an_existing_scheduler(client, tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(tiny_spec("out", models=[{"name": "shallow2d"}])))
    code = cli.main(["study", str(path), "--scheduler", client.scheduler.address])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "3 tasks, 0 already done, 3 ran, 0 failed" in out
    assert len(studies.load(tmp_path / "out")) == 3


def test_study_command_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("images: []\nregions: {rule: boxes, boxes: []}\nmodels: []\nmethods: []\n")
    assert cli.main(["study", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("napari-pdcr: error: study spec: regions.boxes: empty")
    assert cli.main(["study", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("change, key", [
    ({"models": [{"name": "unet2d"}, {"name": "unet"}]}, r"models\[1\]\.name: unknown demo model 'unet'"),
    ({"methods": [{"name": "region_effect"}]}, r"methods\[0\]\.name: unknown method 'region_effect'"),
    ({"methods": [{"name": "region_effects", "settings": {"n_draws": 3}}]},
     r"methods\[0\]\.settings\.n_draws: not a setting of region_effects"),
    ({"methods": [{"name": "region_effects", "settings": {"seed": 3}}]}, r"methods\[0\]\.settings\.seed: set by the study"),
    ({"images": [{"sample": "colin27"}]}, r"images\[0\]\.sample: unknown sample 'colin27'"),
    ({"images": [{"sample": "colin27_slice", "crp": CROP}]}, r"images\[0\]\.crp: unknown key"),
    ({"regions": {"rule": "boundary", "count": 0}}, r"regions\.count: expected an integer >= 1"),
    ({"regions": {"rule": "random"}}, r"regions\.rule: 'random' is not one of"),
    ({"seeds": [0, -1]}, r"seeds\[1\]: expected an integer >= 0"),
    ({"device": "gpu"}, r"device: 'gpu' is not one of auto, cpu, cuda"),
    ({"metrics": {"faithfulness": {"fills": ["patch_bank"]}}}, r"metrics\.faithfulness\.fills\[0\]: unknown fill"),
    ({"images": [{"file": "nowhere.npy", "mask": "m.npy"}]}, r"images\[0\]\.file: .*nowhere\.npy does not exist"),
])
def test_spec_errors_name_the_key(tmp_path, change, key):
    with pytest.raises(SpecError, match=rf"^study spec: {key}"):
        load_spec(tiny_spec(tmp_path, **change))


def test_spec_file_needs_images_and_names_bad_yaml(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("models: [unet2d\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(path)
    path.write_text("models: [{name: unet2d}]\n")
    with pytest.raises(SpecError, match="study spec: images: missing"):
        load_spec(path)


def test_task_ids_follow_the_settings(tmp_path):
    first, _ = tasks.plan_tasks(load_spec(tiny_spec(tmp_path)))
    same, _ = tasks.plan_tasks(load_spec(tiny_spec(tmp_path)))
    changed, _ = tasks.plan_tasks(load_spec(tiny_spec(tmp_path, methods=[
        {"name": "region_effects", "settings": {**FAST, "n_estimate": 3}}])))
    assert [t.id for t in first] == [t.id for t in same] and len({t.id for t in first}) == 6
    assert not {t.id for t in first} & {t.id for t in changed}
    regions = [t.region for t in first if t.model.name == "unet2d"]
    mask = load_sample("colin27_slice")["mask"][70:134, :64] != 0
    for region in regions:  # boundary boxes are centred on boundary voxels of the mask
        box = tasks.region_array(region, None, mask.shape)
        assert mask[box].any() and (~mask[box]).any()


def test_method_names_come_from_the_methods_package():
    from napari_pdcr.methods import ComponentEffects, RegionEffects
    from napari_pdcr.studies.spec import method_classes, method_settings

    known = method_classes()
    assert known["region_effects"] is RegionEffects and known["component_effects"] is ComponentEffects
    assert {"block_shape", "n_estimate", "batch_size"} <= set(method_settings(RegionEffects))


def test_profiles_give_mean_and_interval_per_model():
    import pandas as pd

    table = pd.DataFrame({"model": ["a", "a", "a", "b"], "method": ["m"] * 4, "image": ["x", "x", "y", "x"],
                          "region": ["r0", "r1", "r0", "r0"], "status": ["done"] * 4,
                          "locality": [0.2, 0.4, 0.6, 0.9], "fraction_positive": [0.1, 0.2, 0.3, 0.4]})
    profiles = aggregate.profiles(table).set_index("model")
    assert profiles.loc["a", "locality_mean"] == pytest.approx(0.4)
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std([0.2, 0.4, 0.6], ddof=1) / np.sqrt(3)
    assert profiles.loc["a", "locality_high"] == pytest.approx(0.4 + half)
    assert np.isnan(profiles.loc["b", "locality_low"]) and profiles.loc["a", "n_images"] == 2


def test_reader_opens_one_task_of_a_study_store(client, tmp_path):
    from napari_pdcr._napari.reader import get_reader, read_explanation, read_study

    studies.run(tiny_spec(tmp_path / "out", models=[{"name": "shallow2d"}]), client=client, progress=quiet)
    task_id = studies.load(tmp_path / "out")["task_id"].iloc[0]
    task = tmp_path / "out" / "study.zarr" / "tasks" / task_id
    assert get_reader(str(task)) is read_explanation
    layers = read_explanation(str(task))
    assert layers[0][0].shape == (64, 64) and layers[0][2] == "image"
    assert any(kind == "image" and "ATE" in meta.get("name", "") for _, meta, kind in layers[1:])
    root = str(tmp_path / "out" / "study.zarr")
    assert get_reader(root) is read_study
    with pytest.raises(ValueError, match="study store with 3 finished tasks: open one task"):
        read_study(root)
