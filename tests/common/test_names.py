"""few: the first names of a listing, then how many there are in all; key_mismatch: a checkpoint against a model."""

from mrgfast.common.names import few, key_mismatch


def test_short_listings_are_whole():
    assert few([]) == ""
    assert few(["a"]) == "a"
    assert few([f"k{i}" for i in range(8)]) == "k0, k1, k2, k3, k4, k5, k6, k7"


def test_long_listings_name_the_first_and_count_all():
    assert few([f"k{i}" for i in range(9)]) == "k0, k1, k2, k3, k4, k5, k6, k7, ... (9 in all)"
    assert few(list(range(30)), 3) == "0, 1, 2, ... (30 in all)"


def test_show_writes_each_name():
    assert few(["q_proj", "v_proj", "o_proj"], 2, show=repr) == "'q_proj', 'v_proj', ... (3 in all)"


def test_key_mismatch_lists_each_kind_with_counts():
    message = key_mismatch(["a.weight", "b.weight"], ["extra"], ["c (2,) (expected (3,))"])
    assert message == ("missing 2 weight(s): a.weight, b.weight; 1 unexpected weight(s): extra; "
                       "1 weight(s) of the wrong shape: c (2,) (expected (3,))")
    assert key_mismatch([], [], []) == ""
    assert key_mismatch([f"k{i}" for i in range(20)], []).endswith("(20 in all)")
