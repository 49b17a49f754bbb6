import numpy as np
import pytest

from gradsweep.train.data import (DigitsConfig, DigitSumConfig, ToyConfig, generate_digit_sum, read_digit_sum,
                                  write_digit_sum)
from gradsweep.train.registry import build
from gradsweep.errors import DataError

pytestmark = pytest.mark.unit


def test_digit_sum_sizes_labels_and_noise():
    ds = build("data", DigitSumConfig())
    assert (len(ds.train), len(ds.dev), len(ds.test)) == (300, 100, 100)
    assert ds.num_classes == 19 and ds.train.x.shape == (300, 20)
    for split in (ds.train, ds.dev, ds.test):
        x, y = split.x.numpy(), split.y.numpy()
        assert (y == x[:, 0] + x[:, 1]).all()
        assert ((x[:, 2:] != 0).sum(axis=1) <= 1).all()  # one noisy position (maybe set to 0)
    pairs = {(a, b) for a, b in ds.train.x[:, :2].tolist()}
    assert len(pairs) == 100


def test_digit_sum_seeded():
    a, b = generate_digit_sum(DigitSumConfig(seed=3)), generate_digit_sum(DigitSumConfig(seed=3))
    c = generate_digit_sum(DigitSumConfig(seed=4))
    assert all(np.array_equal(a[s][0], b[s][0]) for s in a)
    assert not np.array_equal(a["train"][0], c["train"][0])


def test_file_reader_round_trips(tmp_path):
    splits = generate_digit_sum(DigitSumConfig(length=7))
    write_digit_sum(tmp_path, splits)
    back = read_digit_sum(tmp_path)
    for s in splits:
        assert np.array_equal(back[s][0], splits[s][0]) and np.array_equal(back[s][1], splits[s][1])
    ds = build("data", DigitSumConfig(path=str(tmp_path)))
    assert ds.train.x.shape == (300, 7)


def test_file_reader_names_file_and_line(tmp_path):
    write_digit_sum(tmp_path, generate_digit_sum(DigitSumConfig(length=5)))
    lines = (tmp_path / "dev.txt").read_text().splitlines()
    lines[41] = "1 2 x 0 0\t3"
    (tmp_path / "dev.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"dev.txt:42: bad line"):
        read_digit_sum(tmp_path)


@pytest.mark.parametrize("line,bad", [
    ("1 2 1_0 0 0\t3", "bad line"),  # int() takes it
    ("1 2 \u0663 0 0\t3", "not a text file of ASCII digits"),  # Arabic-Indic 3: int() takes it too
    ("1 2 3 0 0\t+6", "bad line"),
    ("1 2 3 0 0\t19", "the label 0-18"),
    ("1 2 3 0 0\t\u0666", "not a text file of ASCII digits"),
])
def test_only_ascii_digits_are_digits(tmp_path, line, bad):
    write_digit_sum(tmp_path, generate_digit_sum(DigitSumConfig(length=5)))
    lines = (tmp_path / "train.txt").read_text().splitlines()
    lines[6] = line
    (tmp_path / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"train.txt:7: ") as err:
        read_digit_sum(tmp_path)
    assert bad in str(err.value)


def test_binary_garbage_names_the_file(tmp_path):
    write_digit_sum(tmp_path, generate_digit_sum(DigitSumConfig(length=5)))
    (tmp_path / "test.txt").write_bytes(b"1 2 3 0 0\t6\n\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match=r"test.txt:2: not a text file of ASCII digits \(byte 0x89\)"):
        read_digit_sum(tmp_path)


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_toy_sets(name):
    ds = build("data", ToyConfig(name=name))
    assert (len(ds.train), len(ds.dev), len(ds.test)) == (640, 160, 200)
    assert ds.num_classes == 2 and ds.train.x.shape[1] == 2


def test_digits_ship_with_sklearn():
    ds = build("data", DigitsConfig())
    assert ds.train.x.shape[1:] == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train) + len(ds.dev) + len(ds.test) == 1797
