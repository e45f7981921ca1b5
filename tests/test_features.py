"""Tokeniser, vocabulary, hashing and batches, checked against hand-written expectations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from itemsage.data.text import Tokens, Vocabulary, field_strings, normalize, tokenize
from itemsage.model.batch import ProductStore, featurize
from itemsage.model.hash_embedding import HASH_A1, HASH_A2, HASH_B1, HASH_B2, HASH_PRIME, hash_token_ids

# ---- tokenize -------------------------------------------------------------------------------------

WOOD_CHAIR = Tokens(
    ["wood", "chair"],
    ["wood#chair"],
    ["#wo", "woo", "ood", "od#", "d#c", "#ch", "cha", "hai", "air", "ir#"],
)


def test_spec_example_wood_chair():
    assert tokenize("wood chair") == WOOD_CHAIR


def test_whitespace_runs_and_ends_do_not_add_tokens():
    assert tokenize("  Wood \t\n  CHAIR ") == WOOD_CHAIR


def test_full_width_characters_become_ascii():
    # Full-width letters and the ideographic space (U+3000) fold to plain ASCII under NFKC.
    assert normalize("ＷＯＯＤ\u3000ＣＨＡＩＲ") == "wood chair"
    assert tokenize("ＷＯＯＤ\u3000ＣＨＡＩＲ") == WOOD_CHAIR


def test_accents_composed_and_case_folded():
    expected = Tokens(
        ["café", "crème"],
        ["café#crème"],
        ["#ca", "caf", "afé", "fé#", "é#c", "#cr", "crè", "rèm", "ème", "me#"],
    )
    assert tokenize("Café Crème") == expected
    # Decomposed accents (e + U+0301 combining acute) compose to the same tokens.
    assert tokenize("Cafe\u0301 Cre\u0300me") == expected
    assert normalize("Straße") == "strasse"


def test_cjk_runs_are_one_word_and_trigrams_cover_characters():
    assert tokenize("木製の椅子 テーブル") == Tokens(
        ["木製の椅子", "テーブル"],
        ["木製の椅子#テーブル"],
        ["#木製", "木製の", "製の椅", "の椅子", "椅子#", "子#テ", "#テー", "テーブ", "ーブル", "ブル#"],
    )


def test_combining_marks_stay_inside_words():
    # Devanagari vowel signs are combining marks; a bare `\w+` would cut the word at each of them.
    assert tokenize("हिन्दी भाषा").unigrams == ["हिन्दी", "भाषा"]


def test_emoji_dropped_from_words_kept_in_trigrams():
    assert tokenize("chair 🪑 set") == Tokens(
        ["chair", "set"],
        ["chair#set"],
        ["#ch", "cha", "hai", "air", "ir#", "r#🪑", "#🪑#", "🪑#s", "#se", "set", "et#"],
    )


def test_punctuation_splits_words_and_stays_in_trigrams():
    tokens = tokenize("Hello, world! (2-pack)")
    assert tokens.unigrams == ["hello", "world", "2", "pack"]
    assert tokens.bigrams == ["hello#world", "world#2", "2#pack"]
    assert tokens.trigrams == [
        "#he", "hel", "ell", "llo", "lo,", "o,#", ",#w", "#wo", "wor", "orl", "rld", "ld!", "d!#",
        "!#(", "#(2", "(2-", "2-p", "-pa", "pac", "ack", "ck)", "k)#",
    ]
    assert tokenize("snake_case don't").unigrams == ["snake", "case", "don", "t"]


def test_empty_whitespace_short_and_repeated():
    empty = Tokens([], [], [])
    assert tokenize("") == empty
    assert tokenize("  \t\n ") == empty
    assert tokenize("\u3000") == empty
    assert tokenize("A") == Tokens(["a"], [], ["#a#"])
    assert tokenize("a a") == Tokens(["a", "a"], ["a#a"], ["#a#", "a#a", "#a#"])
    assert tokenize("!!") == Tokens([], [], ["#!!", "!!#"])


def test_field_strings():
    assert field_strings(None) == []
    assert field_strings(float("nan")) == []
    assert field_strings("") == []
    assert field_strings("   ") == []
    assert field_strings("oak") == ["oak"]
    assert field_strings(["oak", "", None, " ", "pine", float("nan")]) == ["oak", "pine"]
    assert field_strings(np.array(["oak", "pine"])) == ["oak", "pine"]
    assert field_strings(pa.array(["oak", None])) == ["oak"]
    assert field_strings(42) == ["42"]
    assert field_strings([]) == []


# ---- vocabulary -----------------------------------------------------------------------------------


def test_vocab_caps_and_tie_order():
    vocab = Vocabulary.build([["red chair"], ["red table"], ["blue chair"]],
                             max_unigrams=3, max_bigrams=2, max_trigrams=0)
    # counts: chair 2, red 2, blue 1, table 1 -> the tie at 2 and at 1 is broken by string order
    assert vocab.unigrams == ["chair", "red", "blue"]
    # every bigram occurs once: string order, first two kept
    assert vocab.bigrams == ["blue#chair", "red#chair"]
    assert vocab.trigrams == []
    assert len(vocab) == 5


def test_vocab_counts_repeats_and_orders_by_frequency():
    # A repeated string (same field value on many products) counts each time.
    vocab = Vocabulary.build([["b"], ["b"], ["a"], "b", ["c", "c", "a"]])
    assert vocab.unigrams == ["b", "a", "c"]  # b 3, then a 2 and c 2 tied -> string order
    assert vocab.trigrams == ["#b#", "#a#", "#c#"]


def test_no_bigram_across_list_items():
    assert Vocabulary.build([["red", "chair"]]).bigrams == []
    assert Vocabulary.build([["red chair"]]).bigrams == ["red#chair"]


def test_token_ids_order_kinds_and_oov():
    vocab = Vocabulary.build([["a b"]])
    assert vocab.unigrams == ["a", "b"]  # ids 0, 1
    assert vocab.bigrams == ["a#b"]  # id 2
    assert vocab.trigrams == ["#a#", "#b#", "a#b"]  # ids 3, 4, 5: 'a#b' bigram != 'a#b' trigram
    # tokens of "a b" in order: unigrams a b, bigram a#b, trigrams #a# a#b #b#
    np.testing.assert_array_equal(vocab.token_ids(["a b"]), [0, 1, 2, 3, 5, 4])
    # "a z": z, a#z and the trigrams a#z, #z# are out of vocabulary
    np.testing.assert_array_equal(vocab.token_ids(["a z"]), [0, 3])
    # two strings of one field: concatenated, repeats kept
    np.testing.assert_array_equal(vocab.token_ids(["b", "b"]), [1, 4, 1, 4])
    assert vocab.token_ids([]).dtype == np.int64 and len(vocab.token_ids([])) == 0
    assert len(vocab.token_ids(["zzz"])) == 0


def test_vocab_save_load_fingerprint(tmp_path):
    vocab = Vocabulary.build([["Café Crème"], ["木製の椅子"]])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab
    assert loaded.fingerprint() == vocab.fingerprint()
    np.testing.assert_array_equal(loaded.token_ids(["café"]), vocab.token_ids(["café"]))
    other = Vocabulary(vocab.unigrams[::-1], vocab.bigrams, vocab.trigrams)  # same tokens, other ids
    assert other.fingerprint() != vocab.fingerprint()
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not an itemsage vocabulary"):
        Vocabulary.load(tmp_path / "bad.json")


# ---- hashing --------------------------------------------------------------------------------------


def test_the_two_hashes_spread_ids_and_are_independent():
    """What the constants are for: each hash fills the buckets evenly, and the pair (h1, h2) tells
    ids apart far better than one hash (a second hash that followed the first would not)."""
    n, buckets = 50_000, 1_000
    h1, h2 = hash_token_ids(torch.arange(n), buckets)
    for h in (h1, h2):
        counts = np.bincount(h.numpy(), minlength=buckets)  # 50 expected in each
        assert counts.min() >= 25 and counts.max() <= 75  # no bucket starved or crowded (a bad multiplier fails)
    pair = h1.numpy().astype(np.int64) * buckets + h2.numpy()
    _, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
    shared = float((counts[inverse] > 1).mean())  # ids whose (h1, h2) another id also has
    # independent hashes: ~ n / buckets**2 = 5% of ids share both; one hash alone: every id shares
    assert shared < 0.08
    assert (HASH_A1, HASH_B1) != (HASH_A2, HASH_B2) and HASH_PRIME == 2**31 - 1  # a prime modulus


def test_hash_hand_computed_values():
    h1, h2 = hash_token_ids(torch.tensor([0, 1, 2]), 100_000)
    # h1: id 0 -> 12345; id 1 -> 1103515245 + 12345 = 1103527590 -> 27590;
    #     id 2 -> 2207042835 - 2147483647 = 59559188 -> 59188
    assert h1.tolist() == [12_345, 27_590, 59_188]
    # h2: id 0 -> 1013904223 -> 4223; id 1 -> 1015568748 -> 68748; id 2 -> 1017233273 -> 33273
    assert h2.tolist() == [4_223, 68_748, 33_273]
    assert h1.dtype == torch.int64 and h2.dtype == torch.int64


def test_hash_matches_python_big_integers_without_overflow():
    ids = [0, 7, 12_345, 999_999, 2**30, 2**31 - 2]
    h1, h2 = hash_token_ids(torch.tensor(ids), 100_000)
    assert h1.tolist() == [(HASH_A1 * i + HASH_B1) % HASH_PRIME % 100_000 for i in ids]
    assert h2.tolist() == [(HASH_A2 * i + HASH_B2) % HASH_PRIME % 100_000 for i in ids]


def test_hash_range_and_independence():
    ids = torch.arange(50_000)
    h1, h2 = hash_token_ids(ids, 1_000)
    for h in (h1, h2):
        assert int(h.min()) >= 0 and int(h.max()) < 1_000
        assert len(torch.unique(h)) == 1_000  # every bucket used
    assert (h1 != h2).float().mean() > 0.99
    again = hash_token_ids(ids.view(100, 500), 1_000)  # shape kept, same values
    assert torch.equal(again[0].reshape(-1), h1)
    with pytest.raises(ValueError):
        hash_token_ids(torch.tensor([-1]), 10)


# ---- featurize / ProductStore ---------------------------------------------------------------------

FIELDS = ("title", "description")
# ids: wood 0, chair 1, table 2, red 3, oak 4, wood#chair 5
VOCAB = Vocabulary(["wood", "chair", "table", "red", "oak"], ["wood#chair"], [])


def _table() -> pa.Table:
    return pa.table({
        "product_id": ["p1", "p2", "p3"],
        "title": [["Wood chair"], ["Red table"], ["wood table", "red"]],
        "description": [["Oak"], [], ["Oak chair"]],  # p2: empty field
        "image_embeddings": pa.array(
            [[[1.0, 2.0], [3.0, 4.0]], [], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]],  # p2: no image
            type=pa.list_(pa.list_(pa.float32())),
        ),
    })


def _assert_batches_equal(a, b):
    for name in ("images", "image_mask", "token_ids", "token_offsets"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_featurize_hand_computed():
    batch = featurize(_table(), VOCAB, FIELDS, max_images=2, image_dim=2)
    assert len(batch) == 3 and batch.num_fields == 2
    # p1 title "wood chair" -> wood chair wood#chair; description "oak" -> oak
    # p2 title "red table" -> red table (red#table OOV); description empty
    # p3 title "wood table" + "red" -> wood table | red; description "oak chair" -> oak chair
    assert batch.token_ids.tolist() == [0, 1, 5, 4, 3, 2, 0, 2, 3, 4, 1]
    assert batch.token_offsets.tolist() == [0, 3, 4, 6, 6, 9]
    assert batch.token_ids.dtype == torch.int64 and batch.token_offsets.dtype == torch.int64
    assert batch.field_mask.tolist() == [[True, True], [True, False], [True, True]]
    # M = 3 images present at most, capped at max_images = 2
    assert batch.images.shape == (3, 2, 2) and batch.images.dtype == torch.float32
    assert batch.image_mask.tolist() == [[True, True], [False, False], [True, True]]
    assert batch.images.tolist() == [[[1, 2], [3, 4]], [[0, 0], [0, 0]], [[5, 6], [7, 8]]]


def test_featurize_pads_to_batch_max_and_keeps_one_slot():
    only_p2 = featurize(_table().take([1]), VOCAB, FIELDS, max_images=20, image_dim=2)
    assert only_p2.images.shape == (1, 1, 2) and not only_p2.image_mask.any()
    assert only_p2.token_ids.tolist() == [3, 2] and only_p2.token_offsets.tolist() == [0, 2]
    all3 = featurize(_table(), VOCAB, FIELDS, max_images=20, image_dim=2)
    assert all3.images.shape == (3, 3, 2) and all3.image_mask.sum(1).tolist() == [2, 0, 3]


def test_featurize_rejects_wrong_width_and_missing_field():
    with pytest.raises(ValueError, match="width 3"):
        featurize(_table(), VOCAB, FIELDS, max_images=2, image_dim=3)
    with pytest.raises(ValueError, match="brand"):
        featurize(_table(), VOCAB, ("title", "brand"), max_images=2, image_dim=2)


def test_featurize_accepts_plain_string_columns():
    table = _table().set_column(1, "title", pa.array(["Wood chair", None, "wood table"]))
    batch = featurize(table, VOCAB, FIELDS, max_images=2, image_dim=2)
    assert batch.token_ids.tolist() == [0, 1, 5, 4, 0, 2, 4, 1]
    assert batch.token_offsets.tolist() == [0, 3, 4, 4, 4, 6]  # p2: both bags empty


def test_product_store_batch_equals_featurize(tmp_path):
    table = _table()
    pq.write_table(table, tmp_path / "products.parquet")
    # batch_rows=1: one part per product, the first with images comes after one without.
    store = ProductStore.from_dataset(tmp_path, VOCAB, FIELDS, max_images=2, batch_rows=1, progress=False)
    assert len(store) == 3 and store.image_dim == 2
    assert list(store.ids) == ["p1", "p2", "p3"]
    np.testing.assert_array_equal(store.index_of(["p3", "p1"]), [2, 0])
    for rows in ([0, 1, 2], [2, 0], [1], [1, 1], [2, 1, 0, 2]):
        _assert_batches_equal(store.batch(np.array(rows)),
                              featurize(table.take(rows), VOCAB, FIELDS, max_images=2, image_dim=2))
    empty = store.batch(np.array([], dtype=np.int64))
    assert len(empty) == 0 and empty.token_offsets.numel() == 0
    with pytest.raises(IndexError):
        store.batch(np.array([3]))


def test_product_store_float16_and_unknown_ids(tmp_path):
    pq.write_table(_table(), tmp_path / "products.parquet")
    store = ProductStore.from_dataset(tmp_path, VOCAB, FIELDS, max_images=2, image_dtype="float16",
                                      progress=False)
    batch = store.batch([2])
    assert batch.images.dtype == torch.float32 and batch.images.tolist() == [[[5, 6], [7, 8]]]
    with pytest.raises(KeyError, match="nope"):
        store.index_of(["p1", "nope"])


def test_batch_to_device_keeps_values():
    batch = featurize(_table(), VOCAB, FIELDS, max_images=2, image_dim=2)
    _assert_batches_equal(batch.to("cpu"), batch)


def test_product_store_without_images(tmp_path):
    pq.write_table(_table().drop_columns(["image_embeddings"]), tmp_path / "products.parquet")
    store = ProductStore.from_dataset(tmp_path, VOCAB, FIELDS, max_images=2, batch_rows=2, progress=False)
    assert store.image_dim == 0
    batch = store.batch([0, 2])
    assert batch.images.shape == (2, 1, 0) and not batch.image_mask.any()
    assert batch.token_ids.tolist() == [0, 1, 5, 4, 0, 2, 3, 4, 1]
