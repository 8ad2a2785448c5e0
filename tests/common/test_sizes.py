"""``parse_size``: the forms ``--expert-memory`` accepts, and helpful errors for the rest."""
import pytest

from common.sizes import SizeSpec, format_bytes, parse_size


@pytest.mark.parametrize("text, nbytes", [
    ("4GiB", 4 * 1024**3),
    ("512MiB", 512 * 1024**2),
    ("1.5GB", 1_500_000_000),
    ("123", 123),
    ("123B", 123),
    ("2k", 2000),
    ("64KiB", 65536),
    ("1tib", 1024**4),
    (" 8 mib ", 8 * 1024**2),
    ("0.5KiB", 512),
])
def test_absolute_sizes(text, nbytes):
    spec = parse_size(text)
    assert spec == SizeSpec(nbytes=nbytes)
    assert spec.fraction is None
    assert spec.resolve(10**15) == nbytes  # an absolute size ignores the total


def test_int_is_bytes():
    assert parse_size(4096) == SizeSpec(nbytes=4096)


@pytest.mark.parametrize("text, fraction", [("25%", 0.25), ("100%", 1.0), ("12.5 %", 0.125), ("0.1%", 0.001)])
def test_percentages(text, fraction):
    spec = parse_size(text)
    assert spec.nbytes is None and spec.fraction == pytest.approx(fraction)


def test_percentage_resolves_against_the_total():
    assert parse_size("25%").resolve(1000) == 250
    assert parse_size("100%").resolve(98304 * 32) == 98304 * 32
    assert parse_size("33%").resolve(100) == 33


@pytest.mark.parametrize("text", ["0%", "150%", "100.5%", "0.0%"])
def test_percentage_out_of_range(text):
    with pytest.raises(ValueError, match=r"--expert-memory .*percentage must be in \(0, 100\]"):
        parse_size(text, what="--expert-memory")


@pytest.mark.parametrize("text", ["lots", "", "4 GiBs", "1e9", "-5", "-5MiB", "5%%", "GiB", "1.2.3", "4XB", "%"])
def test_malformed_names_the_accepted_forms(text):
    with pytest.raises(ValueError) as info:
        parse_size(text, what="--expert-memory")
    msg = str(info.value)
    assert msg.startswith(f"--expert-memory {text!r}")
    assert "is not a size" in msg
    for form in ("bytes", "MiB", "GiB", "%"):
        assert form in msg


@pytest.mark.parametrize("text", ["0", "0MiB", "0.0001", "0.1B"])
def test_zero_bytes_rejected(text):
    with pytest.raises(ValueError, match="must be positive"):
        parse_size(text, what="--expert-memory")


def test_default_what():
    with pytest.raises(ValueError, match=r"^size 'x' is not a size"):
        parse_size("x")


def test_str_and_format_bytes():
    assert str(parse_size("25%")) == "25%"
    assert str(parse_size("12.5%")) == "12.5%"
    assert str(parse_size("4GiB")) == "4.0 GiB"
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(786432) == "768.0 KiB"
    assert format_bytes(3 * 1024**4) == "3.0 TiB"
    assert format_bytes(5 * 1024**5) == "5120.0 TiB"


def test_parse_bytes_refuses_a_share():
    """A read's piece or a probe's length has no total to take a share of: ``25%`` resolved to 0 bytes."""
    from common.sizes import parse_bytes

    assert parse_bytes("4MiB", what="--read-chunk") == 4 << 20 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match="--disk-probe '25%': give a size in bytes"):
        parse_bytes("25%", what="--disk-probe")


def test_a_size_beyond_any_machine_is_a_clear_error_not_an_overflow():
    """Digits past a float's range were inf, and int(inf) raised OverflowError: a traceback in the CLI and an
    'internal' error from memd's admin resize (an audit)."""
    import pytest

    from common.sizes import parse_size

    for text in ("1" + "9" * 400, str(2**64), "20000000TiB"):
        with pytest.raises(ValueError, match="beyond any machine"):
            parse_size(text, what="--expert-memory")
