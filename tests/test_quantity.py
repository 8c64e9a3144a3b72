"""Quantities parse the way Kubernetes reads them and print back in the shortest exact form."""

from decimal import Decimal

import pytest

from vmquota import quantity


@pytest.mark.parametrize(("text", "value", "canonical"), [
    ("500m", Decimal("0.5"), "500m"),
    ("2", Decimal(2), "2"),
    ("1.5Gi", Decimal(1536 * 2**20), "1536Mi"),
    ("2048Mi", Decimal(2 * 2**30), "2Gi"),
    ("10G", Decimal(10 * 10**9), "10G"),
    ("3000Mi", Decimal(3000 * 2**20), "3000Mi"),
    ("2500m", Decimal("2.5"), "2500m"),
    ("1e3", Decimal(1000), "1k"),
    ("0", Decimal(0), "0"),
    ("100n", Decimal("0.0000001"), "100n"),
])
def test_parse_and_format_round_trip(text: str, value: Decimal, canonical: str) -> None:
    assert quantity.parse(text) == value
    assert quantity.format(value) == canonical
    assert quantity.parse(canonical) == value


def test_yaml_numbers_are_quantities() -> None:
    assert quantity.parse(4) == 4
    assert quantity.parse(0.5) == Decimal("0.5")


def test_values_finer_than_a_nano_round_up() -> None:
    assert quantity.format(Decimal("0.0000000001")) == "1n"


@pytest.mark.parametrize("bad", ["", " 1", "1 ", "1X", "2XB", "Gi", "1.2.3", "--1", "1e999", "9Ei", "\u0661",
                                 True, None])
def test_bad_quantities_are_refused_quoting_the_input(bad: object) -> None:
    with pytest.raises(quantity.QuantityError) as refused:
        quantity.parse(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(refused.value) or "too large" in str(refused.value)
