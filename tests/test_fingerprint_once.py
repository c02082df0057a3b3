"""A user's dataset is fingerprinted once per sweep, not once per grid point: for a folder of images a
fingerprint walks every file, so a per-point walk made a 10,000-trial sweep cost hours before it started."""

from poisonsweep.engine.config import sweep_from_mapping
from poisonsweep.tasks.data import fingerprint
from test_data_formats import write_image_folder


def test_a_sweep_reads_an_image_folder_once_for_all_its_trials(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "pets")
    walks = []
    real = fingerprint.FINGERPRINTS["image_folder"]
    monkeypatch.setitem(fingerprint.FINGERPRINTS, "image_folder", lambda params: walks.append(1) or real(params))
    sweep = sweep_from_mapping({
        "name": "pets", "data": {"name": "image_folder", "params": {"path": str(tmp_path / "pets"), "size": 8}},
        "poison": {"method": "one_shift", "rate": 0.1}, "model": {"name": "mlp"}, "detectors": ["loss"],
        "sweep": {"seed": [0, 1, 2, 3, 4], "poison.rate": [0.1, 0.2]}})
    assert len(sweep.trials) == 10 and len(walks) == 1
    assert len({t["data"]["fingerprint"] for t in sweep.trials}) == 1 and sweep.trials[0]["data"]["fingerprint"]
