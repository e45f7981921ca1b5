"""Signal check of the graph stage: does the train-window graph carry signal beyond content? No model
is trained: each product is ranked by plain cosine over frozen vectors.

closeup: for each closeup row of the window (query_product_id -> product_id), the catalog (query
product left out) is ranked by
  content        cos(v_q, v_j)                      v = frozen query vector (main image)
  graph          cos(g_q, v_j)                      g = walk token (pooled neighbour content)
  content+graph  cos(unit(v_q + g_q), v_j)
  graph->graph   cos(g_q, g_j), g_j := v_j where product j has no graph feature
  1-hop <type>   cos(h_q, v_j)                      h = that edge type's pooled 1-hop neighbours
  neighbours     q's walk neighbours by visit count (nothing else ranked)
  content+neighbours  cos(v_q, v_j) + NB_BETA x visits(q, j) / max_j visits(q, j)
  popularity     train-window engagement count
A query without its graph feature falls back to content. Recall@10, pessimistic ties.
search pairs: in the window, each search row's product ranked from the previous distinct product
engaged with the same text. home: a user's last 10 distinct train-window products (by latest
engagement), masked in every ranking; content = unit mean of their v; graph = unit mean of their g
(masked ones skipped); neighbours = sum over history of each product's visit counts / its row total.

Choose options on the validation window, report on test:

    python benchmarks/graph_signal.py DATASET [--window validation|test] [--json out.json] [k=v GraphConfig overrides]
    python benchmarks/graph_signal.py DATASET --sweep   # the one-at-a-time sweep of docs/METHOD.md (validation)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from itemsage import schema
from itemsage.graph import edges, features, walks
from itemsage.graph.config import EDGE_TYPES, GraphConfig


def _build_graph(ds: Path, cfg: GraphConfig) -> edges.Graph:
    ids = pq.read_table(ds / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID])[schema.PRODUCT_ID].combine_chunks()
    return edges.build_graph(edges.read_train(ds, ids, cfg), len(ids), cfg)


def _graph_features(graph, nb, vectors, cfg):
    weights = [nb.matrix if t == "walk" else graph.by_type.get(t, sp.csr_matrix(graph.adjacency.shape, dtype=np.float32))
               for t in cfg.tokens]
    parts = list(features.pooled_blocks(weights, vectors))
    return SimpleNamespace(names=cfg.tokens, tokens=np.concatenate([p[1] for p in parts]).astype(np.float32),
                           mask=np.concatenate([p[2] for p in parts]))


G = SimpleNamespace(  # the stage's pieces under the names the checks below use
    GraphConfig=GraphConfig, EDGE_TYPES=EDGE_TYPES, build_graph=_build_graph,
    neighbourhoods=lambda graph, cfg: walks.neighbourhoods(graph.adjacency, cfg),
    content_vectors=features.content_vectors, graph_features=_graph_features,
    _codes=edges._codes, _product_rows=lambda column, ids: edges._product_rows(column, ids, len(column)))

K = 10
NB_BETA = 0.2  # content+neighbours: cos + NB_BETA x visit count / the row's largest


def unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def ranks_of(scores: np.ndarray, target: np.ndarray, excluded: list[np.ndarray] | None = None,
             exclude_cols: np.ndarray | None = None) -> np.ndarray:
    """scores [Q, N]; rank of target[q] (pessimistic ties), excluded products set to -inf."""
    scores = scores.astype(np.float64, copy=True)
    if exclude_cols is not None:
        scores[np.arange(len(scores)), exclude_cols] = -np.inf
    if excluded is not None:
        rows = np.repeat(np.arange(len(excluded)), [len(e) for e in excluded])
        cols = np.concatenate(excluded) if excluded else np.empty(0, int)
        keep_t = scores[np.arange(len(scores)), target].copy()
        scores[rows, cols] = -np.inf
        scores[np.arange(len(scores)), target] = keep_t  # a relevant item in the history stays (unreachable only if masked)
    t = scores[np.arange(len(scores)), target]
    return (scores > t[:, None]).sum(1) + (scores == t[:, None]).sum(1) - 1


def recall_by_rank(scores_fn, target, n_q, block=2048, **kw):
    out = np.empty(n_q, np.int64)
    for lo in range(0, n_q, block):
        sl = slice(lo, lo + block)
        out[sl] = ranks_of(scores_fn(sl), target[sl], **{k: (v[sl] if v is not None else None) for k, v in kw.items()})
    return out


def neighbour_rank(nbm: sp.csr_matrix, query_rows_weights: sp.csr_matrix, target, excluded=None):
    """Rank target among the products scored by sparse query rows (others: not ranked = inf)."""
    s = (query_rows_weights @ nbm).tocsr()
    ranks = np.full(len(target), np.iinfo(np.int64).max)
    for i in range(len(target)):  # evaluation only: a loop over test rows, not part of the stage
        a, b = s.indptr[i], s.indptr[i + 1]
        cols, vals = s.indices[a:b], s.data[a:b]
        if excluded is not None and len(excluded[i]):
            keepm = ~np.isin(cols, excluded[i])
            cols, vals = cols[keepm], vals[keepm]
        hit = np.flatnonzero(cols == target[i])
        if len(hit):
            tv = vals[hit[0]]
            ranks[i] = (vals > tv).sum() + (vals == tv).sum() - 1
    return ranks


def load_window(ds: Path, window: str, ids):
    file = {"validation": schema.VALIDATION_FILE, "test": schema.TEST_FILE}[window]
    t = pq.read_table(ds / file, columns=[schema.SURFACE, schema.PRODUCT_ID, schema.USER_ID,
                                          schema.QUERY_PRODUCT_ID, schema.TIMESTAMP, schema.QUERY_TEXT],
                      read_dictionary=[schema.PRODUCT_ID, schema.QUERY_PRODUCT_ID, schema.USER_ID,
                                       schema.QUERY_TEXT])
    return t


def run(ds: str, cfg: G.GraphConfig, window: str = "test", home_history: int = 10, nb_fn=None,
        graph=None) -> dict:
    ds = Path(ds)
    t0 = time.perf_counter()
    cfg = GraphConfig(**{**cfg.to_dict(), "tokens": ("walk",) + tuple(t for t in EDGE_TYPES if cfg.edge_type_weights.get(t))})
    graph = graph or G.build_graph(ds, cfg)
    nb = (nb_fn or G.neighbourhoods)(graph, cfg)
    feats = G.graph_features(graph, nb, G.content_vectors(ds, cfg.content), cfg)
    build_s = time.perf_counter() - t0
    ids = pq.read_table(ds / schema.PRODUCTS_FILE, columns=[schema.PRODUCT_ID])[schema.PRODUCT_ID].combine_chunks()
    V = unit(G.content_vectors(ds, "query_vector"))
    n = len(V)
    gi = {name: i for i, name in enumerate(feats.names)}
    Gw, Mw = feats.tokens[:, gi["walk"]], feats.mask[:, gi["walk"]]
    train = pq.read_table(ds / schema.TRAIN_FILE, columns=[schema.PRODUCT_ID, schema.USER_ID, schema.TIMESTAMP],
                          read_dictionary=[schema.PRODUCT_ID, schema.USER_ID])
    tp = G._product_rows(train[schema.PRODUCT_ID], ids)
    pop = np.bincount(tp[tp >= 0], minlength=n).astype(np.float64)
    warm = pop > 0
    win = load_window(ds, window, ids)
    surf = np.array(win[schema.SURFACE].to_pylist())
    wp = G._product_rows(win[schema.PRODUCT_ID], ids)
    wq = G._product_rows(win[schema.QUERY_PRODUCT_ID], ids)
    nbm = nb.matrix
    res: dict = {"build_s": build_s, "graph": graph.stats, "window": window}
    top1 = np.argsort(-pop, kind="stable")[: max(1, n // 100)]
    is_top = np.zeros(n, bool); is_top[top1] = True
    res["hub_share"] = {"top1pct_share_of_engagements": float(pop[top1].sum() / pop.sum()),
                        "top1pct_share_of_neighbour_slots": float(is_top[nbm.indices].mean()),
                        "top1pct_share_of_neighbour_importance": float(
                            (nbm.data * is_top[nbm.indices]).sum() / nbm.data.sum())}

    # ---------------- closeup
    sel = np.flatnonzero((surf == "closeup") & (wq >= 0) & (wp >= 0) & (wq != wp))
    q, p = wq[sel], wp[sel]
    has = Mw[q]
    queries = {
        "content": V[q],
        "graph": np.where(has[:, None], Gw[q], V[q]),
        "content+graph": unit(V[q] + np.where(has[:, None], Gw[q], 0)),
    }
    for tname in [t for t in G.EDGE_TYPES if t in gi]:
        h, hm = feats.tokens[:, gi[tname]], feats.mask[:, gi[tname]]
        queries[f"1-hop {tname}"] = np.where(hm[q][:, None], h[q], V[q])
    cand_gg = np.where(Mw[:, None], Gw, V)
    ranks = {}
    for name, Q in queries.items():
        ranks[name] = recall_by_rank(lambda sl, Q=Q: Q[sl] @ V.T, p, len(q), exclude_cols=q)
    ranks["graph->graph"] = recall_by_rank(lambda sl: queries["graph"][sl] @ cand_gg.T, p, len(q), exclude_cols=q)
    ranks["popularity"] = recall_by_rank(lambda sl: np.broadcast_to(pop, (len(range(*sl.indices(len(q)))), n)),
                                         p, len(q), exclude_cols=q)
    onehot = sp.csr_matrix((np.ones(len(q), np.float32), (np.arange(len(q)), q)), shape=(len(q), n))
    ranks["neighbours"] = neighbour_rank(nbm, onehot, p)
    rowmax = np.asarray(nbm.max(1).todense()).ravel()
    nbx = (sp.diags(1.0 / np.maximum(rowmax, 1e-12)).astype(np.float32) @ nbm).tocsr()
    ranks["content+neighbours"] = recall_by_rank(
        lambda sl: V[q[sl]] @ V.T + NB_BETA * nbx[q[sl]].toarray(), p, len(q), exclude_cols=q)
    splits = {"all": np.ones(len(q), bool), "query has graph": has, "query no graph": ~has,
              "engaged warm": warm[p], "engaged cold": ~warm[p]}
    res["closeup"] = {s: {"n": int(m.sum()), **{k: float((r[m] < K).mean()) if m.any() else None
                                                for k, r in ranks.items()}} for s, m in splits.items()}
    res["closeup"]["all"]["neighbours@T"] = float((ranks["neighbours"] < cfg.top_t).mean())

    # ---------------- search pairs: in the window, each search row's product from the previous
    # distinct product engaged with the same text (time order), ranked from that product
    txt, _ = G._codes(win[schema.QUERY_TEXT])
    ssel = np.flatnonzero((surf == "search") & (txt >= 0) & (wp >= 0))
    ssel = ssel[np.argsort(txt[ssel], kind="stable")]
    gt, gp = txt[ssel], wp[ssel]
    nxt = np.flatnonzero((gt[1:] == gt[:-1]) & (gp[1:] != gp[:-1])) + 1
    sq, sp_ = gp[nxt - 1], gp[nxt]
    key = sq.astype(np.int64) * n + sp_
    _, uidx = np.unique(key, return_index=True)  # each (query product, product) pair once
    sq, sp_ = sq[np.sort(uidx)], sp_[np.sort(uidx)]
    shas = Mw[sq]
    squeries = {"content": V[sq], "graph": np.where(shas[:, None], Gw[sq], V[sq]),
                "content+graph": unit(V[sq] + np.where(shas[:, None], Gw[sq], 0))}
    for tname in [t for t in G.EDGE_TYPES if t in gi]:
        h, hm = feats.tokens[:, gi[tname]], feats.mask[:, gi[tname]]
        squeries[f"1-hop {tname}"] = np.where(hm[sq][:, None], h[sq], V[sq])
    sr = {name: recall_by_rank(lambda sl, Q=Q: Q[sl] @ V.T, sp_, len(sq), exclude_cols=sq)
          for name, Q in squeries.items()}
    sr["popularity"] = recall_by_rank(lambda sl: np.broadcast_to(pop, (len(range(*sl.indices(len(sq)))), n)),
                                      sp_, len(sq), exclude_cols=sq)
    onehot_s = sp.csr_matrix((np.ones(len(sq), np.float32), (np.arange(len(sq)), sq)), shape=(len(sq), n))
    sr["neighbours"] = neighbour_rank(nbm, onehot_s, sp_)
    sr["content+neighbours"] = recall_by_rank(
        lambda sl: V[sq[sl]] @ V.T + NB_BETA * nbx[sq[sl]].toarray(), sp_, len(sq), exclude_cols=sq)
    ssplits = {"all": np.ones(len(sq), bool), "query has graph": shas, "query no graph": ~shas,
               "engaged warm": warm[sp_], "engaged cold": ~warm[sp_]}
    res["search pairs"] = {s_: {"n": int(m.sum()), **{k: float((r[m] < K).mean()) if m.any() else None
                                                    for k, r in sr.items()}} for s_, m in ssplits.items()}

    # ---------------- home: history = last `home_history` distinct train products per user
    tu_codes, tu_dict = G._codes(train[schema.USER_ID])
    tt = train[schema.TIMESTAMP].cast("int64").to_numpy()
    ok = (tp >= 0) & (tu_codes >= 0)
    u_, p_, t_ = tu_codes[ok], tp[ok], tt[ok]
    order = np.lexsort((-t_, u_))  # by user, latest first
    u_, p_ = u_[order], p_[order]
    key = u_.astype(np.int64) * n + p_
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)  # first (= latest) occurrence of each (user, product), still user/latest order
    u_, p_ = u_[first], p_[first]
    st = np.ones(len(u_), bool); st[1:] = u_[1:] != u_[:-1]
    fidx = np.flatnonzero(st)
    rank_in = np.arange(len(u_)) - np.repeat(fidx, np.diff(np.append(fidx, len(u_))))
    keep = rank_in < home_history
    u_, p_ = u_[keep], p_[keep]
    H = sp.csr_matrix((np.ones(len(u_), np.float32), (u_, p_)), shape=(len(tu_dict), n))
    # window home rows -> train user codes
    wu_codes, wu_dict = G._codes(win[schema.USER_ID])
    import pyarrow.compute as pc
    map_u = pc.fill_null(pc.index_in(wu_dict, value_set=tu_dict), -1).to_numpy()
    wu = np.where(wu_codes >= 0, map_u[np.maximum(wu_codes, 0)], -1)
    hsel = np.flatnonzero((surf == "home") & (wp >= 0) & (wu >= 0))
    hsel = hsel[np.diff(H.indptr)[wu[hsel]] > 0]
    users, hp = wu[hsel], wp[hsel]
    Hq = H[users]  # [Q, N] history indicator
    excluded = [Hq.indices[Hq.indptr[i]:Hq.indptr[i + 1]] for i in range(len(users))]
    content_q = unit(np.asarray(Hq @ V))
    Hg = Hq.multiply(Mw[None, :].astype(np.float32)).tocsr()
    hasg = np.diff(Hg.indptr) > 0
    graph_q = np.where(hasg[:, None], unit(np.asarray(Hg @ Gw)), content_q)
    hq = {"content": content_q, "graph": graph_q, "content+graph": unit(content_q + np.where(hasg[:, None], graph_q, 0))}
    hr = {}
    in_hist = np.array([hp[i] in set(excluded[i]) for i in range(len(users))])
    for name, Q in hq.items():
        hr[name] = recall_by_rank(lambda sl, Q=Q: Q[sl] @ V.T, hp, len(users),
                                  excluded=excluded)
    hr["graph->graph"] = recall_by_rank(lambda sl: graph_q[sl] @ cand_gg.T, hp, len(users),
                                        excluded=excluded)
    hr["popularity"] = recall_by_rank(lambda sl: np.broadcast_to(pop, (len(range(*sl.indices(len(users)))), n)),
                                      hp, len(users), excluded=excluded)
    rowsum = np.asarray(nbm.sum(1)).ravel()
    nbn = sp.diags(1.0 / np.maximum(rowsum, 1e-12)).astype(np.float32) @ nbm
    hr["neighbours"] = neighbour_rank(nbn, Hq, hp, excluded)
    def hcomb(sl):
        sc = (Hq[sl] @ nbn).toarray()
        sc /= np.maximum(sc.max(1, keepdims=True), 1e-12)
        return content_q[sl] @ V.T + NB_BETA * sc
    hr["content+neighbours"] = recall_by_rank(hcomb, hp, len(users), excluded=excluded)
    for r in hr.values():
        r[in_hist] = np.iinfo(np.int64).max  # masked history: unreachable, as evaluate's home protocol
    hsplits = {"all": np.ones(len(users), bool), "engaged warm": warm[hp], "engaged cold": ~warm[hp],
               "engaged in history": in_hist}
    res["home"] = {s: {"n": int(m.sum()), **{k: float((r[m] < K).mean()) if m.any() else None
                                             for k, r in hr.items()}} for s, m in hsplits.items()}
    res["home"]["users_without_history_rows"] = int(((surf == "home") & (wp >= 0)).sum() - len(hsel))
    return res


def table(res: dict) -> str:
    lines = []
    for surface in ("closeup", "search pairs", "home"):
        block = {k: v for k, v in res[surface].items() if isinstance(v, dict)}
        methods = [k for k in next(iter(block.values())) if k not in ("n", "neighbours@T")]
        lines.append(f"\n{surface} ({res['window']}) Recall@{K}")
        lines.append("| split | n | " + " | ".join(methods) + " |")
        lines.append("|---|---:|" + "---:|" * len(methods))
        for s, row in block.items():
            lines.append(f"| {s} | {row['n']} | " + " | ".join(
                "–" if row[m] is None else f"{row[m]:.3f}" for m in methods) + " |")
    return "\n".join(lines)


def _variants() -> list[tuple[str, dict]]:
    ew = GraphConfig().edge_type_weights
    return [("default", {}),
            ("hub_exponent 0.25", {"hub_exponent": 0.25}), ("hub_exponent 0.5", {"hub_exponent": 0.5}),
            ("hub_exponent 1", {"hub_exponent": 1.0}),
            ("restart 0.3", {"restart": 0.3}), ("restart 0.7", {"restart": 0.7}),
            ("no session", {"edge_type_weights": {**ew, "session": 0}}),
            ("no search", {"edge_type_weights": {**ew, "search": 0}}),
            ("max_degree 20", {"max_degree": 20}), ("max_degree 100", {"max_degree": 100}),
            ("top_t 20", {"top_t": 20}), ("top_t 100", {"top_t": 100}),
            ("walks 16 x 8", {"walks_per_node": 16}), ("walks 64 x 8", {"walks_per_node": 64}),
            ("no recency", {"recency_half_life_days": 0})]


def sweep(ds: str, window: str) -> None:
    print("| variant | closeup graph | closeup content+graph | closeup neighbours | nb@T | home graph | home neighbours "
          "| search-pair graph | search-pair neighbours | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in _variants():
        r = run(ds, GraphConfig(**{"tokens": ("walk",), **kw}), window)  # run() asks for every token with edges
        c, h, s = r["closeup"]["all"], r["home"]["all"], r["search pairs"]["all"]
        print(f"| {name} | {c['graph']:.3f} | {c['content+graph']:.3f} | {c['neighbours']:.3f} | {c['neighbours@T']:.3f} "
              f"| {h['graph']:.3f} | {h['neighbours']:.3f} | {s['graph']:.3f} | {s['neighbours']:.3f} "
              f"| {r['build_s']:.1f} |", flush=True)
    print("content baseline: closeup", round(c["content"], 3), "home", round(h["content"], 3), "search pairs",
          round(s["content"], 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--window", default=None, help="validation (default with --sweep) or test (default)")
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.sweep:
        sweep(a.dataset, a.window or "validation")
        return
    kw = {}
    for o in a.overrides:
        k, v = o.split("=", 1)
        kw[k] = json.loads(v)
    cfg = G.GraphConfig(**kw)
    res = run(a.dataset, cfg, a.window or "test")
    res["config"] = cfg.to_dict()
    print(json.dumps({k: v for k, v in res.items() if k not in ("closeup", "home", "search pairs")}, default=str))
    print(table(res))
    if res["closeup"]["all"].get("neighbours@T") is not None:
        print("closeup engaged product within the query's top-T neighbours:", round(res["closeup"]["all"]["neighbours@T"], 3))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
