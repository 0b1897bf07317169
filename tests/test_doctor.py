from adapt_deploy import doctor


def test_both_onnxruntime_flavours_are_reported_plainly(monkeypatch):
    versions = {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}
    monkeypatch.setattr(doctor, "installed_version", versions.get)
    message = doctor.onnxruntime_conflict()
    assert message is not None and "onnxruntime-gpu" in message and "pip uninstall" in message
    check = next(c for c in doctor.run_checks() if c.name == "onnxruntime")
    assert not check.ok and check.advice == message


def test_one_flavour_is_fine(monkeypatch):
    monkeypatch.setattr(doctor, "installed_version", {"onnxruntime": "1.20.0"}.get)
    assert doctor.onnxruntime_conflict() is None


def test_checks_cover_the_backends():
    names = {c.name for c in doctor.run_checks()}
    assert {"python", "torch", "cv2", "onnx", "onnxruntime", "tensorrt", "cuda-python"} <= names
