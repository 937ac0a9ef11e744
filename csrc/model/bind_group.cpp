// The group path's per-step array work (python/bitdlm/engine/group.py): finding every deciding
// request's candidates in the block table, ranking them (decoding.select_flat), and unmasking
// the selected ones. Each replaces ~15
// small numpy calls (~1-2 us apiece at 64 requests) by one pass over the table's rows; the
// decisions stay in Python (the rules, decoding.select_flat). group.py's docstrings say what
// the values mean; tests/test_scheduler.py checks the group path against the per-request one.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace bitdlm {

namespace {

// A C-contiguous array of exactly `T`, taken with .noconvert() (TypeError otherwise):
// group_unmask writes into the caller's table, a converted copy would take the writes instead.
template <class T>
using Exact = py::array_t<T, py::array::c_style>;

// -> (cand_req, cand_pos, cand_at, out_rows, counts, s0, sub, full): for deciding request i
// (table row rows[i], first masked position first[i], sub-block size sbs[rows[i]]), the masked
// positions of its left-most sub-block that has masks (starting at s0[i]), request by request,
// left to right: the request's index, the block position, the index in the table's flattened
// rows, the output row; candidates per request; the sub-block cache's choice (dual[rows[i]]):
// sub[i], the sub-block alone against the block's scratch K/V (scratch[i] written and s0[i] no
// longer masked: its output rows count from s0[i]), else full[i], a full pass that writes it.
// Output rows are position - shift (row j - 1 predicts position j). scratch: one bool per
// request, or None where no row uses the sub-block cache.
py::tuple group_candidates(Exact<bool> masked, Exact<intptr_t> rows, Exact<intptr_t> first, Exact<intptr_t> sbs,
                           int shift, Exact<bool> dual, const py::handle& scratch_obj) {
  if (masked.ndim() != 2 || rows.ndim() != 1 || first.ndim() != 1 || sbs.ndim() != 1 || dual.ndim() != 1)
    throw std::invalid_argument("group_candidates: masked is [rows, block], the others 1-D");
  const intptr_t R = masked.shape(0), bs = masked.shape(1), n = rows.size();
  if (first.size() != n) throw std::invalid_argument("rows and first differ in length");
  if (sbs.size() != R || dual.size() != R) throw std::invalid_argument("sbs and dual need one value per table row");
  const bool has_scratch = !scratch_obj.is_none();
  if (has_scratch && !py::isinstance<py::list>(scratch_obj)) throw std::invalid_argument("scratch: expected a list or None");
  py::list scratch = has_scratch ? py::reinterpret_borrow<py::list>(scratch_obj) : py::list();
  if (has_scratch && (intptr_t)scratch.size() != n) throw std::invalid_argument("scratch needs one value per request");
  const bool* m = masked.data();
  const intptr_t* rw = rows.data();
  const intptr_t* fi = first.data();
  const intptr_t* sb = sbs.data();
  py::array_t<intptr_t> counts(n);
  py::list s0(n), sub(n), full(n);
  std::vector<intptr_t> req, pos, base;
  req.reserve((size_t)n * 2);
  pos.reserve((size_t)n * 2);
  base.resize((size_t)n);
  for (intptr_t i = 0; i < n; ++i) {
    const intptr_t r = rw[i], f = fi[i], w = r >= 0 && r < R ? sb[r] : 0;
    if (r < 0 || r >= R || w < 1 || f < 0 || f >= bs)
      throw std::invalid_argument("group_candidates: request " + std::to_string(i) + " has row " + std::to_string(r) +
                                  ", first " + std::to_string(f) + ", sub-block size " + std::to_string(w));
    const intptr_t a = f / w * w, b = std::min(a + w, bs);
    const bool* row = m + r * bs;
    intptr_t k = 0;
    for (intptr_t j = a; j < b; ++j)
      if (row[j]) {
        req.push_back(i);
        pos.push_back(j);
        ++k;
      }
    counts.mutable_data()[i] = k;
    bool d = dual.data()[r], si = false;
    if (d) {
      if (!has_scratch) throw std::invalid_argument("a row uses the sub-block cache: scratch is needed");
      si = !row[a] && py::cast<bool>(scratch[(size_t)i]);
    }
    base[(size_t)i] = si ? a : 0;
    s0[(size_t)i] = a;
    sub[(size_t)i] = py::bool_(si);
    full[(size_t)i] = py::bool_(d && !si);
  }
  const intptr_t c = (intptr_t)req.size();
  py::array_t<intptr_t> cand_req(c), cand_pos(c), cand_at(c);
  py::array_t<int32_t> out(c);
  for (intptr_t k = 0; k < c; ++k) {
    cand_req.mutable_data()[k] = req[k];
    cand_pos.mutable_data()[k] = pos[k];
    cand_at.mutable_data()[k] = rw[req[k]] * bs + pos[k];
    out.mutable_data()[k] = (int32_t)(pos[k] - shift - base[(size_t)req[k]]);
  }
  return py::make_tuple(cand_req, cand_pos, cand_at, out, counts, s0, sub, full);
}

// Every selected candidate k (sel[k]) takes token tok[k] at table index cand_at[k] and is no
// longer masked; then per deciding request (table row rows[i]) -> (first: its row's first masked
// position, -1 where none is left; moved: whether that differs from first_before[i], or none is left).
py::tuple group_unmask(Exact<int32_t> blk, Exact<bool> masked, Exact<intptr_t> at, Exact<bool> sel,
                       Exact<int32_t> tok, Exact<intptr_t> rows, Exact<intptr_t> before) {
  if (blk.ndim() != 2 || masked.ndim() != 2 || at.ndim() != 1 || sel.ndim() != 1 || tok.ndim() != 1 ||
      rows.ndim() != 1 || before.ndim() != 1)
    throw std::invalid_argument("group_unmask: blk and masked are [rows, block], the others 1-D");
  const intptr_t R = masked.shape(0), bs = masked.shape(1), c = at.size(), n = rows.size();
  if (blk.shape(0) != R || blk.shape(1) != bs) throw std::invalid_argument("blk and masked differ in shape");
  if (sel.size() != c || tok.size() < c) throw std::invalid_argument("sel and tok need one value per candidate");
  if (before.size() != n) throw std::invalid_argument("rows and first differ in length");
  int32_t* bk = blk.mutable_data();
  bool* m = masked.mutable_data();
  const intptr_t* ap = at.data();
  const bool* sp = sel.data();
  const int32_t* tp = tok.data();
  for (intptr_t k = 0; k < c; ++k)  // (checked before any write)
    if (ap[k] < 0 || ap[k] >= R * bs) throw std::invalid_argument("cand_at " + std::to_string(ap[k]) + " outside the table");
  for (intptr_t i = 0; i < n; ++i)
    if (rows.data()[i] < 0 || rows.data()[i] >= R)
      throw std::invalid_argument("row " + std::to_string(rows.data()[i]) + " outside the table");
  for (intptr_t k = 0; k < c; ++k)
    if (sp[k]) {
      bk[ap[k]] = tp[k];
      m[ap[k]] = false;
    }
  py::list first(n), moved(n);
  for (intptr_t i = 0; i < n; ++i) {
    const bool* row = m + rows.data()[i] * bs;
    intptr_t f = 0;
    while (f < bs && !row[f]) ++f;
    first[(size_t)i] = f == bs ? -1 : f;
    moved[(size_t)i] = py::bool_(f != before.data()[i]);  // (none left: f = bs, never a first position)
  }
  return py::make_tuple(first, moved);
}

// -> rank int64[c.size]: each candidate's place in its request (segment i: the next counts[i]
// entries of c), the most confident first, equal ones (and NaN ones, last) in index order:
// np.lexsort((-c, seg)) inverted per segment (decoding.select_flat's ranking).
py::array_t<int64_t> segment_ranks(Exact<double> c, Exact<int64_t> counts) {
  if (c.ndim() != 1 || counts.ndim() != 1) throw std::invalid_argument("segment_ranks: c and counts are 1-D");
  const double* cp = c.data();
  const int64_t* kp = counts.data();
  int64_t total = 0;
  for (py::ssize_t i = 0; i < counts.size(); ++i) {
    if (kp[i] < 0) throw std::invalid_argument("counts must be >= 0");
    total += kp[i];
  }
  if (total != c.size()) throw std::invalid_argument("counts must add up to the candidates");
  py::array_t<int64_t> rank(c.size());
  int64_t* rp = rank.mutable_data();
  std::vector<int64_t> idx;
  const auto before = [cp](int64_t i, int64_t j) {  // i ranks before j (a strict weak order, NaN last)
    return !std::isnan(cp[i]) && (std::isnan(cp[j]) || cp[i] > cp[j]);
  };
  for (int64_t a = 0, i = 0; i < counts.size(); a += kp[i++]) {
    const int64_t n = kp[i];
    idx.resize((size_t)n);
    for (int64_t k = 0; k < n; ++k) idx[(size_t)k] = a + k;
    if (n <= 32) {  // a sub-block's candidates: an insertion sort (stable; stable_sort allocates a buffer per call)
      for (int64_t k = 1; k < n; ++k) {
        const int64_t x = idx[(size_t)k];
        int64_t j = k;
        for (; j > 0 && before(x, idx[(size_t)j - 1]); --j) idx[(size_t)j] = idx[(size_t)j - 1];
        idx[(size_t)j] = x;
      }
    } else {
      std::stable_sort(idx.begin(), idx.end(), before);
    }
    for (int64_t k = 0; k < n; ++k) rp[idx[(size_t)k]] = k;
  }
  return rank;
}

}  // namespace

void register_group(py::module_& m) {
  m.def("segment_ranks", &segment_ranks, py::arg("c").noconvert(), py::arg("counts").noconvert(),
        "Each candidate's rank in its segment, the most confident first (ties, then NaN, in index order)");
  m.def("group_candidates", &group_candidates, py::arg("masked").noconvert(), py::arg("rows").noconvert(),
        py::arg("first").noconvert(), py::arg("sbs").noconvert(), py::arg("shift"), py::arg("dual").noconvert(),
        py::arg("scratch"),
        "The group path's candidates: (cand_req, cand_pos, cand_at, out_rows, counts, s0, sub, full); see engine/group.py");
  m.def("group_unmask", &group_unmask, py::arg("blk").noconvert(), py::arg("masked").noconvert(),
        py::arg("cand_at").noconvert(), py::arg("sel").noconvert(), py::arg("tok").noconvert(),
        py::arg("rows").noconvert(), py::arg("first").noconvert(),
        "The group path's unmasking, in place -> (first, or -1 where no mask is left; moved); see engine/group.py");
}

}  // namespace bitdlm
