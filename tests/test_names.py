import pytest

from tessera.errors import InvalidNameError, InvalidPathError
from tessera.names import check_alias, check_artifact_path, check_name, parse_version_spec


@pytest.mark.parametrize("name", ["a", "mnist", "run-1", "A.b_c-9", "x" * 128])
def test_valid_names(name):
    assert check_name(name, "project") == name


@pytest.mark.parametrize(
    "name", ["", "-a", ".hidden", "a/b", "a b", "a:b", "x" * 129, "é", None, 3]
)
def test_invalid_names_say_what_is_allowed(name):
    with pytest.raises(InvalidNameError, match="project name"):
        check_name(name, "project")


def test_aliases_cannot_look_like_versions():
    assert check_alias("prod") == "prod"
    assert check_alias("v1beta") == "v1beta"
    with pytest.raises(InvalidNameError, match="version numbers"):
        check_alias("v3")


@pytest.mark.parametrize("path", ["a", "a/b.txt", "dir/sub/file.bin", "ünï/cödé.png", ".hidden"])
def test_valid_artifact_paths(path):
    assert check_artifact_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "x" * 1025,
    ],
)
def test_unsafe_artifact_paths_are_refused(path):
    with pytest.raises(InvalidPathError):
        check_artifact_path(path)


def test_version_specs():
    spec = parse_version_spec("data")
    assert (spec.project, spec.name, spec.selector, spec.number) == (None, "data", "latest", None)
    spec = parse_version_spec("proj/data:v12")
    assert (spec.project, spec.name, spec.number) == ("proj", "data", 12)
    assert str(spec) == "proj/data:v12"
    assert parse_version_spec("data:prod").selector == "prod"
    for bad in ["", "data:", "a/b/c", "data:v01", ":v1", "data:v1:v2"]:
        with pytest.raises(InvalidNameError):
            parse_version_spec(bad)
