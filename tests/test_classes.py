"""Tests of the HCAT3 -> training class mapping against the real EuroCrops tables."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cropchips.fields.classes import (CLASS_NAMES, DEFAULT_CLASS_MAP_PATH, IGNORE_LABEL, LABEL_NAMES, MAX_CLASS_ID,
                                      ClassMap, load_class_map)
from cropchips.errors import ConfigError

SHARED_EUROCROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "eurocrops"


def shared_data(*parts: str) -> Path:
    """Path of a file under ../shared/data/eurocrops; skip if absent, fail instead when CI=true."""
    path = SHARED_EUROCROPS.joinpath(*parts)
    if path.exists():
        return path
    reason = f"reference data {path} is missing (tests expect ../shared/data beside the checkout)"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def class_map() -> ClassMap:
    return load_class_map()


@pytest.fixture(scope="module")
def hcat3() -> pd.DataFrame:
    return pd.read_csv(shared_data("HCAT3.csv"), dtype={"HCAT3_code": str})


@pytest.fixture(scope="module")
def spain() -> pd.DataFrame:
    return pd.read_csv(shared_data("es_2023.csv"), dtype={"original_code": str, "HCAT3_code": str})


@pytest.fixture(scope="module")
def hcat3_class(hcat3: pd.DataFrame, class_map: ClassMap) -> dict[str, int]:
    """HCAT3 name -> class by code (the code path, checked against names elsewhere)."""
    return {row.HCAT3_name: class_map.class_of_code(row.HCAT3_code) for row in hcat3.itertuples()}


def packaged_rows() -> list[dict[str, str]]:
    """Rows of the packaged CSV, parsed here without the code under test."""
    lines = DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8").splitlines()
    data = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(csv.DictReader(data))


def names_with(hcat3: pd.DataFrame, predicate) -> list[str]:
    found = [name for name in hcat3.HCAT3_name if predicate(name)]
    assert found, "the keyword matched no HCAT3 name: the test would check nothing"
    return found


def tokens(name: str) -> set[str]:
    return set(name.split("_"))


# --- the shared-data helper ------------------------------------------------------------


def test_shared_data_skips_without_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="missing"):
        shared_data("no_such_file.csv")


def test_shared_data_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        shared_data("no_such_file.csv")


# --- the whole tables ------------------------------------------------------------------


@pytest.mark.parametrize("table", ["HCAT3.csv", "es_2023.csv"])
def test_code_and_name_agree_on_every_row(table: str, class_map: ClassMap) -> None:
    frame = pd.read_csv(shared_data(table), dtype={"HCAT3_code": str})
    assert len(frame) > 300
    for row in frame.itertuples():
        by_code = class_map.class_of_code(row.HCAT3_code)
        by_name = class_map.class_of_name(row.HCAT3_name)
        assert by_code == by_name, (row.HCAT3_code, row.HCAT3_name, by_code, by_name)
        assert 0 <= by_code <= 8


@pytest.mark.parametrize("table", ["HCAT3.csv", "es_2023.csv"])
def test_classify_matches_scalar_calls(table: str, class_map: ClassMap) -> None:
    frame = pd.read_csv(shared_data(table))  # codes as int64 here
    expected = [class_map.class_of_code(code) for code in frame.HCAT3_code]
    by_code = class_map.classify(frame.HCAT3_code)
    by_name = class_map.classify(pd.Series([None] * len(frame)), frame.HCAT3_name)
    assert by_code.tolist() == expected
    assert by_name.tolist() == expected


def test_every_class_is_used(hcat3_class: dict[str, int]) -> None:
    assert set(hcat3_class.values()) == set(range(9))


def test_packaged_rows_exist_in_hcat3_with_the_same_name(hcat3: pd.DataFrame) -> None:
    name_of = dict(zip(hcat3.HCAT3_code, hcat3.HCAT3_name))
    rows = packaged_rows()
    assert len(rows) > 40
    for row in rows:
        assert row["hcat3_code"] in name_of, f"{row['hcat3_code']} is not an HCAT3 code"
        assert row["hcat3_name"] == name_of[row["hcat3_code"]], row
        assert row["class_id"] == "" or 0 <= int(row["class_id"]) <= 8, row


def test_packaged_csv_is_documented() -> None:
    text = DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8")
    assert text.startswith("#")
    for class_id, name in CLASS_NAMES.items():
        assert f"{class_id} {name}" in text, f"header comment does not explain class {class_id}"
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for words in ("ignore", "255", "unmapped_label", LABEL_NAMES[IGNORE_LABEL]):
        assert words in header, f"header comment does not explain {words}"


# --- independent expectations ----------------------------------------------------------

EXPECTED_BY_NAME = {
    "olive_plantations": 1,
    "olives_for_oil_production": 1,
    "table_olives": 1,
    "vineyards_wine_vine_rebland_grapes": 2,
    "citrus_plantations": 3,
    "apples": 3,
    "peach": 3,
    "pears": 3,
    "cherry_cherries": 3,
    "kiwi": 3,
    "avocado": 3,
    "orchards_fruits": 3,
    "raspberry_raspberries": 3,
    "almond": 4,
    "nuts": 4,
    "walnuts": 4,
    "pistachio": 4,
    "carob": 4,
    "tree_wood_forest": 4,
    "oak": 4,
    "eucalyptus": 4,
    "afforestation_reforestation": 4,
    "other_tree_wood_forest": 4,
    "common_soft_wheat": 5,
    "winter_common_soft_wheat": 5,
    "durum_hard_wheat": 5,
    "spring_durum_hard_wheat": 5,
    "barley": 5,
    "unspecified_season_barley": 5,
    "oats": 5,
    "triticale": 5,
    "legumes_dried_pulses_protein_crops": 6,
    "beans": 6,
    "chickpeas": 6,
    "lentils": 6,
    "peas": 6,
    "sweet_lupins": 6,
    "soy_soybeans": 6,
    "tomato": 7,
    "melon": 7,
    "watermelon": 7,
    "potatoes": 7,
    "sweet_potatoes": 7,
    "strawberries": 7,
    "onions": 7,
    "broccoli": 7,
    "carrots_daucus": 7,
    "bell_pepper_paprika": 7,
    "spinach": 7,
    "fresh_vegetables": 7,
    "fallow_land_not_crop": 8,
    # 0: not in any class, or deliberately split off a parent that is
    "grain_maize_corn_popcorn": 0,
    "green_silo_maize": 0,
    "rye": 0,
    "spelt": 0,
    "rice": 0,
    "cereal": 0,
    "other_cereals": 0,
    "buckwheat": 0,
    "pasture_meadow_grassland_grass": 0,
    "not_known_and_other": 0,
    "alfalfa_lucerne": 0,
    "vetches": 0,
    "esparsette_onobrychis": 0,
    "onobrychis_sainfoins": 0,
    "sunflower": 0,
    "rapeseed_rape": 0,
    "mustard": 0,
    "brassicaceae_cruciferae": 0,
    "sugar_beet": 0,
    "mangelwurzel_fodder_beet": 0,
    "lemon_balm_melissa": 0,
    "other_permanent_crops_plantations": 0,
    "nurseries_nursery": 0,
    "unmaintained": 0,
    "greenhouse_foil_film": 0,
    "peat_turf": 0,
    "arable_crops": 0,
    "permanent_crops_perennial": 0,
    "crop_type": 0,
}


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED_BY_NAME.items()))
def test_expected_class_of_hcat3_name(
    name: str, expected: int, hcat3_class: dict[str, int], class_map: ClassMap
) -> None:
    assert name in hcat3_class, f"{name} is not an HCAT3 name"
    assert hcat3_class[name] == expected
    assert class_map.class_of_name(name) == expected


KEYWORDS = [
    # (what, predicate on an HCAT3 name, expected class)
    ("olive", lambda n: "olive" in n, 1),
    ("vine/wine/grape", lambda n: any(k in n for k in ("vine", "wine", "grape")), 2),
    ("citrus", lambda n: "citrus" in n, 3),
    ("fruit trees", lambda n: bool(tokens(n) & {"apples", "apricots", "plums", "quinces", "nectarine"}), 3),
    ("almond", lambda n: "almond" in n, 4),
    ("nut trees", lambda n: bool(tokens(n) & {"walnuts", "hazelnuts", "pecan", "pistachio", "chestnuts"}), 4),
    ("forest", lambda n: "forest" in n, 4),
    ("wheat", lambda n: "durum" in n or "common_soft_wheat" in n, 5),
    ("barley/oats/triticale", lambda n: bool(tokens(n) & {"barley", "oats", "triticale"}), 5),
    ("beans", lambda n: "bean" in n, 6),  # beans, soy_soybeans
    ("peas/chickpeas/lentils", lambda n: bool(tokens(n) & {"peas", "chickpeas", "lentils"}), 6),
    ("tomato", lambda n: "tomato" in n, 7),
    ("melon", lambda n: "melon" in n, 7),  # melon, watermelon
    ("potato", lambda n: "potato" in n, 7),  # potatoes, sweet_potatoes: both vegetables
    ("fallow", lambda n: "fallow" in n, 8),
    ("maize", lambda n: "maize" in n, 0),
    ("rye", lambda n: "rye" in tokens(n), 0),
    ("pasture", lambda n: "pasture" in n, 0),
]


@pytest.mark.parametrize(("what", "predicate", "expected"), KEYWORDS, ids=[k[0] for k in KEYWORDS])
def test_keyword_names(what: str, predicate, expected: int, hcat3: pd.DataFrame, hcat3_class: dict[str, int]) -> None:
    for name in names_with(hcat3, predicate):
        assert hcat3_class[name] == expected, f"{name} ({what})"


def test_keyword_false_friends(hcat3_class: dict[str, int]) -> None:
    # Substrings that must not pull a name into a class.
    assert hcat3_class["buckwheat"] != 5  # "wheat"
    assert hcat3_class["peach"] != 6 and hcat3_class["pears"] != 6  # "pea"
    assert hcat3_class["peat_turf"] != 6
    assert hcat3_class["lemon_balm_melissa"] != 3  # "lemon"
    assert hcat3_class["oak"] == 4 and hcat3_class["oats"] == 5


def test_every_descendant_of_olives_inherits(hcat3: pd.DataFrame, class_map: ClassMap) -> None:
    for code in hcat3.HCAT3_code:
        if code.startswith("330305"):
            assert class_map.class_of_code(code) == 1
        if code.startswith("3302") or code.startswith("3399"):
            assert class_map.class_of_code(code) == 0


SPAIN_EXPECTED = {
    "OLIVO": 1,
    "ACEBUCHE": 1,
    "OLIVAR - FRUTAL": 1,
    "VIÑA": 2,
    "UVA DE MESA": 2,
    "VIÑA - OLIVAR": 2,
    "NARANJO": 3,
    "LIMONERO": 3,
    "MANDARINO": 3,
    "CLEMENTINA": 3,
    "MELOCOTONERO": 3,
    "MANZANO": 3,
    "MANGO": 3,
    "AGUACATE": 3,
    "ALMENDRO": 4,
    "NOGAL": 4,
    "PISTACHO": 4,
    "ALGARROBO": 4,
    "ENCINA": 4,
    "EUCALIPTO": 4,
    "PINO": 4,
    "TRIGO BLANDO": 5,
    "TRIGO DURO": 5,
    "CEBADA": 5,
    "AVENA": 5,
    "TRITICALE": 5,
    "MEZCLA CEBADA-VEZA": 5,
    "JUDÍA": 6,
    "GARBANZO": 6,
    "LENTEJA": 6,
    "GUISANTE": 6,
    "HABA": 6,
    "SOJA": 6,
    "CACAHUETE": 6,
    "TOMATE": 7,
    "TOMATE PARA TRANSFORMACIÓN": 7,
    "MELÓN": 7,
    "SANDÍA": 7,
    "PATATA": 7,
    "BONIATO": 7,
    "CEBOLLA": 7,
    "LECHUGA": 7,
    "FRESA": 7,
    "HUERTA": 7,
    "BARBECHO TRADICIONAL": 8,
    "BARBECHO SIN PRODUCCIÓN": 8,
    "BARBECHO MEDIOAMBIENTAL": 8,
    "BARBECHO DE BIODIVERSIDAD (INCLUYE MELÍFERAS)": 8,
    "MAÍZ": 0,
    "CENTENO": 0,
    "ARROZ": 0,
    "GIRASOL": 0,
    "ALFALFA": 0,
    "VEZA": 0,
    "ESPARCETA": 0,
    "REMOLACHA": 7,  # table beetroot in es_2023 (beetroot_beets), not sugar beet
    "PASTOS PERMANENTES DE 5 O MÁS AÑOS": 0,
    "PRODUCTO DESCONOCIDO": 0,
    "CAQUI o PALOSANTO": 0,
    "RASTROJERAS": 0,
}


def test_spain_rows_by_original_name(spain: pd.DataFrame, class_map: ClassMap) -> None:
    by_name = {row.original_name.strip(): row for row in spain.itertuples()}
    for original_name, expected in SPAIN_EXPECTED.items():
        row = by_name[original_name]
        assert class_map.class_of_code(row.HCAT3_code) == expected, (original_name, row.HCAT3_name)
        assert class_map.class_of_code(int(row.HCAT3_code)) == expected, original_name
        assert class_map.class_of_name(row.HCAT3_name) == expected, original_name


def test_spain_fallow_and_citrus_keywords(spain: pd.DataFrame, class_map: ClassMap) -> None:
    fallow = spain[spain.original_name.str.startswith("BARBECHO")]
    assert len(fallow) >= 4
    assert set(class_map.classify(fallow.HCAT3_code)) == {8}
    citrus = spain[spain.original_name.str.match(r"(NARANJO|LIMONERO|MANDARINO|CLEMENTINA|POMELO|SATSUMA|LIMA)\b")]
    assert len(citrus) >= 8
    assert set(class_map.classify(citrus.HCAT3_code)) == {3}


# --- scalar and vectorised API ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (3303050000, 1),
        (np.int64(3303050100), 1),
        ("3303050200", 1),
        (" 3303050200 ", 1),
        (3301010100.0, 5),
        (np.float64(3301010401), 5),
        ("3301110000.0", 8),
        ("3301010300", 0),  # rye
        (3399000000, 0),
        (None, 0),
        (float("nan"), 0),
        (pd.NA, 0),
        ("", 0),
        ("olive", 0),
        ("33030500x0", 0),
        ("3303_050000", 0),
        (-3303050000, 0),
        (3303050000.5, 0),
        (True, 0),
    ],
)
def test_class_of_code_inputs(code: object, expected: int, class_map: ClassMap) -> None:
    assert class_map.class_of_code(code) == expected


def test_class_of_name_inputs(class_map: ClassMap) -> None:
    assert class_map.class_of_name("olives_for_oil_production") == 1
    assert class_map.class_of_name("  Durum_Hard_Wheat ") == 5
    assert class_map.class_of_name("TABLE_OLIVES") == 1
    assert class_map.class_of_name("olive") == 0
    assert class_map.class_of_name("") == 0
    assert class_map.class_of_name(None) == 0
    assert class_map.class_of_name(float("nan")) == 0


def test_classify_mixed_series_with_name_fallback(class_map: ClassMap) -> None:
    codes = pd.Series(
        [3303050000, 3301010100.0, "3303060000", None, float("nan"), "garbage", 3399000000, None, "3301280000"],
        dtype=object,
    )
    names = pd.Series(
        ["ignored", None, "x", "olive_plantations", "TRITICALE ", "fallow_land_not_crop", "table_olives", "unknown", None]
    )
    result = class_map.classify(codes, names)
    assert result.dtype == np.uint8
    # code wins when parseable (3399000000 -> 0 even though the name says olives)
    assert result.tolist() == [1, 5, 2, 1, 5, 8, 0, 0, 7]
    assert class_map.classify(codes).tolist() == [1, 5, 2, 0, 0, 0, 0, 0, 7]


def test_classify_numeric_arrays_and_index(class_map: ClassMap) -> None:
    floats = np.array([3303050000.0, np.nan, 3301020500.0])
    assert class_map.classify(floats).tolist() == [1, 0, 6]
    assert class_map.classify(floats, ["x", "melon", "x"]).tolist() == [1, 7, 6]
    # positions, not index labels, pair codes with names
    codes = pd.Series([None, None], index=[10, 20])
    names = pd.Series(["barley", "tomato"], index=[20, 10])
    assert class_map.classify(codes, names).tolist() == [5, 7]
    nullable = pd.Series([3303060000, None], dtype="Int64")
    assert class_map.classify(nullable).tolist() == [2, 0]
    assert class_map.classify(pd.Series([], dtype=object)).tolist() == []


def test_classify_length_mismatch(class_map: ClassMap) -> None:
    with pytest.raises(ValueError, match="names"):
        class_map.classify([None, None], ["barley"])


def test_classify_many_rows(class_map: ClassMap) -> None:
    rng = np.random.default_rng(0)
    pool = np.array([3303050000, 3301010401, 3301280000, 3302000000, 3301110000], dtype=np.int64)
    expected_pool = np.array([1, 5, 7, 0, 8])
    pick = rng.integers(0, len(pool), 1_000_000)
    result = class_map.classify(pd.Series(pool[pick]))
    assert result.dtype == np.uint8
    assert np.array_equal(result, expected_pool[pick])


# --- loading and validation ------------------------------------------------------------

HEADER = "# a comment\nhcat3_code,hcat3_name,class_id\n"


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "classes.csv"
    path.write_text(body, encoding="utf-8")
    return path


def test_small_map_loads(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "3303050000,olive_plantations,1\n3303050100,olives_for_oil_production,\n")
    cmap = load_class_map(path)
    assert cmap.class_of_code(3303050200) == 1
    assert cmap.class_of_name("olives_for_oil_production") == 1
    assert cmap.class_of_code(3301010100) == 0
    assert load_class_map(str(path)) == cmap


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        (HEADER + "3303050000,olive_plantations,9\n", ["line 3", "class_id '9'", "0..8", "ignore"]),
        (HEADER + "3303050000,olive_plantations,255\n", ["line 3", "class_id '255'", "ignore"]),
        (HEADER + "3303050000,olive_plantations,ignored\n", ["line 3", "class_id 'ignored'"]),
        (HEADER + "3303050000,olive_plantations,-1\n", ["line 3", "0..8"]),
        (HEADER + "3303050000,olive_plantations,one\n", ["line 3", "class_id 'one'"]),
        (
            HEADER + "3303050000,olive_plantations,1\n# x\n3303050000,olive_plantations_again,2\n",
            ["line 5", "3303050000", "already appears on line 3"],
        ),
        (HEADER + "3303050000,olive_plantations,1\n3303060000,OLIVE_PLANTATIONS,2\n", ["line 4", "name"]),
        ("# c\nhcat3_code,class_id\n3303050000,1\n", ["line 2", "hcat3_name"]),
        ("code,name,class\n3303050000,olive_plantations,1\n", ["line 1", "hcat3_code", "hcat3_name", "class_id"]),
        (HEADER + "olive,olive_plantations,1\n", ["line 3", "hcat3_code 'olive'", "10-digit"]),
        (HEADER + "330305,olive_plantations,1\n", ["line 3", "10-digit"]),
        (HEADER + "3303050000,olive_plantations\n", ["line 3", "fields"]),
        (HEADER + "3303050000,,1\n", ["line 3", "hcat3_name is empty"]),
        (HEADER + "3303050100,olives_for_oil_production,\n", ["line 3", "no rule row covers it"]),
        (HEADER, ["no rule rows"]),
        ("# only comments\n", ["no header"]),
    ],
)
def test_bad_files_raise_config_error(tmp_path: Path, body: str, fragments: list[str]) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_class_map(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_class_map(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_user_edited_map_changes_results(tmp_path: Path, class_map: ClassMap) -> None:
    text = DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8")
    assert "\n3303050200,table_olives,\n" in text
    edited = text.replace("\n3303050200,table_olives,\n", "\n3303050200,table_olives,0\n")
    edited += "3301010300,rye,5\n3301010301,winter_rye,\n"
    custom = load_class_map(write(tmp_path, edited))

    assert class_map.class_of_code(3303050200) == 1
    assert custom.class_of_code(3303050200) == 0  # child rule back to 0 beats the olive rule
    assert custom.class_of_name("table_olives") == 0
    assert custom.class_of_code(3303050100) == 1  # sibling keeps the parent's class
    assert class_map.class_of_code(3301010302) == 0
    assert custom.class_of_code(3301010302) == 5  # new rule covers spring_rye by code
    assert custom.class_of_name("winter_rye") == 5
    assert custom.class_of_name("spring_rye") == 0  # not listed as a name-only row
    assert custom.class_of_code(3301010100) == 5


def test_class_map_validates_itself() -> None:
    with pytest.raises(ConfigError, match="0..8"):
        ClassMap(rules=(("330305", 9),), names={})
    with pytest.raises(ConfigError, match="digits"):
        ClassMap(rules=(("33x3", 1),), names={})
    with pytest.raises(ConfigError, match="0..8"):
        ClassMap(rules=(), names={"olive_plantations": 12})
    cmap = ClassMap(rules=(("", 8), ("3303", 3), ("330305", 1)), names={"Olive": 1})
    assert cmap.class_of_code(3303050100) == 1
    assert cmap.class_of_code(3303010000) == 3
    assert cmap.class_of_code(3301010100) == 8  # the empty prefix is a catch-all rule
    assert cmap.class_of_name(" olive ") == 1


def test_class_names() -> None:
    assert sorted(CLASS_NAMES) == list(range(9))
    assert CLASS_NAMES[0] == "no_field"
    assert all(name.isidentifier() and name.islower() for name in CLASS_NAMES.values())
    assert MAX_CLASS_ID == 8 and IGNORE_LABEL == 255
    # Reports name every value a default mask holds: the classes and the ignore label.
    assert sorted(LABEL_NAMES) == [*range(9), 255]
    assert {k: v for k, v in LABEL_NAMES.items() if k != 255} == CLASS_NAMES
    assert LABEL_NAMES[255].isidentifier() and "ignore" in LABEL_NAMES[255]


# --- ignore rows -----------------------------------------------------------------------

IGNORE_MAP = HEADER + """3301010000,cereals,5
3301010600,grain_maize_corn_popcorn,ignore
3301010601,grain_maize,
3301010602,popcorn,2
3302000000,pasture_meadow_grassland_grass,IGNORE
3301010300,rye,0
"""


def test_ignore_rows_map_to_255(tmp_path: Path) -> None:
    cmap = load_class_map(write(tmp_path, IGNORE_MAP))
    assert cmap.class_of_code(3301010600) == 255
    assert cmap.class_of_code(3301010699) == 255  # a descendant inherits ignore
    assert cmap.class_of_code(3301010602) == 2  # a child rule overrides it
    assert cmap.class_of_name("grain_maize") == 255  # a name-only row under an ignore rule
    assert cmap.class_of_code(3302010000) == 255  # IGNORE in any case
    assert cmap.class_of_code(3301010300) == 0  # 0 still means none of the classes
    assert cmap.class_of_code(3301010100) == 5
    assert cmap.class_of_code(3399000000) == 0  # no rule


def test_classify_gives_unmapped_to_fields_of_no_class_and_255_to_ignored(tmp_path: Path) -> None:
    cmap = load_class_map(write(tmp_path, IGNORE_MAP))
    codes = pd.Series([3301010100, 3301010600, 3301010300, 3399000000, "garbage", None, 3301010602], dtype=object)
    names = pd.Series([None, None, None, None, None, "grain_maize", None])
    assert cmap.classify(codes, names).tolist() == [5, 255, 0, 0, 0, 255, 2]
    assert cmap.classify(codes, names, unmapped=255).tolist() == [5, 255, 255, 255, 255, 255, 2]
    assert cmap.classify(codes, names, unmapped=9).tolist() == [5, 255, 9, 9, 9, 255, 2]
    for bad in (1, 8, 256, -1, True, 2.5):
        with pytest.raises(ConfigError, match="unmapped"):
            cmap.classify(codes, names, unmapped=bad)


def test_class_map_accepts_the_ignore_label_only() -> None:
    cmap = ClassMap(rules=(("3302", IGNORE_LABEL), ("33", 5)), names={"pasture": IGNORE_LABEL})
    assert cmap.class_of_code(3302000000) == 255 and cmap.class_of_name("pasture") == 255
    for bad in (9, 254, 256):
        with pytest.raises(ConfigError, match="255"):
            ClassMap(rules=(("3302", bad),), names={})


# --- read_fields on the real parcels -----------------------------------------------------

#: The HCAT3 codes of the 100 real Slovenian parcels, classed by hand from the header comment of
#: hcat_classes.csv (None: none of the 8 classes).
SI_CODE_CLASS = {
    "3302000000": None,  # pasture_meadow_grassland_grass
    "3301010600": None,  # grain_maize_corn_popcorn
    "3301010401": 5,  # winter_barley
    "3301090100": None,  # temporary_grass
    "3301070000": 7,  # fresh_vegetables
    "3301160000": 6,  # soy_soybeans
    "3301010101": 5,  # winter_common_soft_wheat
    "3301090303": None,  # clover
    "3301090301": None,  # alfalfa_lucerne
    "3301010102": 5,  # spring_common_soft_wheat
    "3301011001": None,  # winter_spelt
    "3301010801": 5,  # winter_triticale
    "3301011501": None,  # winter_unspecified_cereals
}


@pytest.fixture(scope="module")
def si_path() -> str:
    return f"zip://{shared_data('SI_2021.zip')}"


@pytest.fixture(scope="module")
def si_expected(si_path: str) -> pd.DataFrame:
    """The parcels' fid and HCAT3 code read with pyogrio here, and the class expected of the code."""
    import pyogrio

    frame = pyogrio.read_dataframe(si_path, columns=["EC_hcat_c", "EC_hcat_n"], fid_as_index=True)
    assert set(frame["EC_hcat_c"]) == set(SI_CODE_CLASS), "the real parcels changed: update SI_CODE_CLASS"
    frame["expected"] = frame["EC_hcat_c"].map(SI_CODE_CLASS)
    frame.index = frame.index.astype(str)
    return frame


def whole_layer_bbox() -> tuple[float, float, float, float]:
    return (15.5, 45.9, 15.8, 46.2)  # the parcels lie in 15.60..15.74 E, 45.98..46.15 N


def test_read_fields_labels_real_parcels_of_no_class_255(si_path: str, si_expected: pd.DataFrame,
                                                         class_map: ClassMap) -> None:
    from cropchips.fields.gpkg import open_layer, read_fields

    layer = open_layer(si_path)
    fields = read_fields(layer, whole_layer_bbox(), class_map)
    assert len(fields) == 100 and fields["class_id"].dtype == np.uint8
    got = fields.set_index("field_id")["class_id"]
    expected = si_expected["expected"].reindex(got.index)
    assert expected.notna().sum() == 19 and expected.isna().sum() == 81  # 41 pastures, 32 maize, ...
    assert (got[expected.isna()] == 255).all()
    assert got[expected.notna()].tolist() == expected[expected.notna()].astype(int).tolist()
    maize = si_expected.index[si_expected["EC_hcat_c"] == "3301010600"]
    assert len(maize) == 32 and (got[maize] == 255).all()

    # unmapped_label=0: the labels before cropchips 0.3, fields of no class drawn as background.
    old = read_fields(layer, whole_layer_bbox(), class_map, unmapped_label=0).set_index("field_id")["class_id"]
    assert old.tolist() == expected.reindex(old.index).fillna(0).astype(int).tolist()
    with pytest.raises(ConfigError, match="unmapped"):
        read_fields(layer, whole_layer_bbox(), class_map, unmapped_label=3)


def test_read_fields_with_ignore_rows_and_broken_codes(si_path: str, si_expected: pd.DataFrame,
                                                       tmp_path: Path) -> None:
    """A GeoPackage copy of the real parcels where some codes are missing or garbage, read with a class
    map that ignores pasture."""
    import geopandas as gpd

    from cropchips.fields.gpkg import open_layer, read_fields

    parcels = gpd.read_file(si_path)
    pasture = parcels.index[parcels["EC_hcat_c"] == "3302000000"]
    barley = parcels.index[parcels["EC_hcat_c"] == "3301010401"]
    maize = parcels.index[parcels["EC_hcat_c"] == "3301010600"]
    parcels.loc[barley[:2], "EC_hcat_c"] = None  # its name still says winter_barley: 5
    parcels.loc[maize[:2], "EC_hcat_c"] = "not a code"
    parcels.loc[maize[:2], "EC_hcat_n"] = None  # nothing usable: unmapped
    gpkg = tmp_path / "si.gpkg"
    parcels.to_file(gpkg, layer="si", driver="GPKG", engine="pyogrio")
    text = DEFAULT_CLASS_MAP_PATH.read_text(encoding="utf-8") + "3302000000,pasture_meadow_grassland_grass,ignore\n"
    cmap = load_class_map(write(tmp_path, text))

    layer = open_layer(gpkg, "si")
    for unmapped in (0, 255, 200):
        got = read_fields(layer, whole_layer_bbox(), cmap, unmapped_label=unmapped)
        # A GeoPackage numbers features from 1, in the order written.
        by_row = got.assign(row=got["field_id"].astype(int) - 1).set_index("row")["class_id"]
        assert (by_row[pasture] == 255).all(), "ignore rows are 255 whatever unmapped_label is"
        assert (by_row[barley] == 5).all()
        assert (by_row[maize] == unmapped).all()
        others = parcels.index.difference(pasture.union(barley).union(maize))
        expected = parcels.loc[others, "EC_hcat_c"].map(SI_CODE_CLASS).fillna(unmapped).astype(int)
        assert by_row[others].tolist() == expected.tolist()
