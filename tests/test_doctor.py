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


def test_the_environment_line_checks_each_switch_and_names_a_typo():
    fine = doctor.environment_check({"ADAPT_DEPLOY_CUDA_GRAPHS": "0", "HOME": "/root"})
    assert fine.ok and fine.found == "ADAPT_DEPLOY_CUDA_GRAPHS=0"
    assert doctor.environment_check({}).found == "no ADAPT_DEPLOY_* set"
    bad = doctor.environment_check(
        {"ADAPT_DEPLOY_ADAPTER_STREAM": "mine", "ADAPT_DEPLOY_CUDA_GRAPH": "0"}
    )
    assert not bad.ok
    assert "ADAPT_DEPLOY_CUDA_GRAPH is not read by adapt-deploy" in bad.advice
    assert "ADAPT_DEPLOY_ADAPTER_STREAM: expected 'own' or 'shared', got 'mine'" in bad.advice
