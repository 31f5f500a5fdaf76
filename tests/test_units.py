import pytest

from emparticles.errors import InputError
from emparticles.units import parse_area_px, parse_length_nm


@pytest.mark.parametrize(
    "text, nm",
    [("2.5nm", 2.5), ("2.5 nm", 2.5), ("25A", 2.5), ("25 Å", 2.5), ("0.3um", 300.0), ("0.3µm", 300.0),
     ("0.3μm", 300.0), ("300pm", 0.3), ("1e-3um", 1.0), ("1.5nm/px", 1.5)],
)
def test_lengths_in_nm(text, nm):
    assert parse_length_nm(text) == pytest.approx(nm)


@pytest.mark.parametrize("text", ["2.5", "abc", "2.5 parsecs", "-1nm", "0nm", ""])
def test_bad_lengths_say_what_to_write(text):
    with pytest.raises(InputError) as err:
        parse_length_nm(text)
    assert "--pixel-size" in str(err.value) and "Fix:" in str(err.value)


def test_min_area_in_pixels_or_physical_units():
    assert parse_area_px("20", None) == 20
    assert parse_area_px("100nm2", 2.0) == pytest.approx(25.0)
    assert parse_area_px("0.01um^2", 10.0) == pytest.approx(100.0)
    with pytest.raises(InputError, match="pixel size is unknown"):
        parse_area_px("100nm2", None)
    with pytest.raises(InputError):
        parse_area_px("lots", 1.0)
