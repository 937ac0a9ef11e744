// Python bindings of the model layer: bitdlm._core.Model (docs/architecture.md).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <atomic>
#include <memory>
#include <string>

#include "bind_arrays.h"
#include "model/model.h"

namespace py = pybind11;

namespace bitdlm {

namespace {

// Owns the Python buffer view (keeps the mmap alive) next to the C++ model.
// `threads` is applied on the thread that calls forward, at every call:
// OpenMP's nthreads-var is per thread, so setting it where the model was
// loaded would not reach an engine thread that runs the forwards.
// Most OpenMP threads a forward may use (llama.cpp's GGML_MAX_N_THREADS is
// 512 too): 10^5 made libgomp fail to start its team (SIGSEGV) and 10^4 ran
// 10^4 OS threads that never finished a step. Python checks first
// (bitdlm._cpu.check_threads) with a friendlier message; this is the guard for
// every other path, OMP_NUM_THREADS included.
constexpr int kMaxThreads = 512;

struct PyModel {
  std::unique_ptr<py::buffer_info> buf;
  std::unique_ptr<Model> model;
  std::atomic<int> threads{0};          // 0 = leave the calling thread's setting alone
  std::atomic<int> forward_threads{0};  // team size the last forward ran with

  void apply_threads() {
    const int n = threads.load();
    if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
    if (omp_get_max_threads() > kMaxThreads) omp_set_num_threads(kMaxThreads);  // OMP_NUM_THREADS=10^5
    forward_threads = omp_get_max_threads();
  }
};

template <class T>
T meta_get(const py::dict& meta, const char* key) {
  if (!meta.contains(key)) throw std::invalid_argument(std::string("model meta lacks key '") + key + "'");
  return meta[key].cast<T>();
}

// An integer vector from a list / numpy array; refuses floats and out-of-int32 values.
std::vector<int32_t> int_vec(const py::handle& obj, const char* what) {
  if (py::isinstance<py::array>(obj)) {  // the engine's int32 arrays, read as they are (~1 us less per array
    // than the conversion to int64 below: two per item, 64 items a step at 64 requests)
    auto a = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = a.dtype();
    if (a.ndim() == 1 && dt.kind() == 'i' && dt.itemsize() == 4 && dt.byteorder() != '>') {
      const auto* p = static_cast<const char*>(a.data());
      const py::ssize_t st = a.strides(0);
      std::vector<int32_t> out((size_t)a.size());
      for (size_t i = 0; i < out.size(); ++i) out[i] = *reinterpret_cast<const int32_t*>(p + (py::ssize_t)i * st);
      return out;
    }
  }
  if (PyList_CheckExact(obj.ptr())) {  // a list of ints (the group path's out_idx): read as it is
    const Py_ssize_t n = PyList_GET_SIZE(obj.ptr());
    std::vector<int32_t> out((size_t)n);
    bool plain = true;
    for (Py_ssize_t i = 0; i < n && plain; ++i) {
      PyObject* x = PyList_GET_ITEM(obj.ptr(), i);
      int overflow = 0;
      const long long v = PyLong_CheckExact(x) ? PyLong_AsLongLongAndOverflow(x, &overflow) : 0;
      plain = PyLong_CheckExact(x) && !overflow && v >= INT32_MIN && v <= INT32_MAX;
      out[(size_t)i] = (int32_t)v;
    }
    if (plain) return out;  // (else the checks and messages below)
  }
  py::array arr = py::array::ensure(obj);
  if (!arr) throw std::invalid_argument(std::string(what) + " must be a sequence of integers");
  if (arr.ndim() > 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  std::vector<int32_t> out;
  if (arr.size() == 0) return out;
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u' && kind != 'b')
    throw std::invalid_argument(std::string(what) + " must hold integers, got dtype " +
                                std::string(py::str(arr.dtype())));
  auto a = PyArr<int64_t>::ensure(arr);
  out.resize(a.size());
  const int64_t* p = a.data();
  for (py::ssize_t i = 0; i < a.size(); ++i) {
    if (p[i] < INT32_MIN || p[i] > INT32_MAX)
      throw std::invalid_argument(std::string(what) + " value " + std::to_string(p[i]) + " out of range");
    out[i] = (int32_t)p[i];
  }
  return out;
}

// None -> default, a number -> broadcast, a sequence -> one value per row.
std::vector<float> per_row(const py::object& obj, int64_t n, float dflt, const char* what) {
  if (obj.is_none()) return std::vector<float>(n, dflt);
  if (py::isinstance<py::float_>(obj) || py::isinstance<py::int_>(obj)) return std::vector<float>(n, obj.cast<float>());
  auto a = F32::ensure(obj);
  if (!a || a.ndim() != 1 || a.size() != n)
    throw std::invalid_argument(std::string(what) + " must be None, a number or " + std::to_string(n) + " numbers");
  return std::vector<float>(a.data(), a.data() + n);
}

std::vector<Item> parse_items(const py::handle& items_obj) {
  std::vector<Item> items;
  for (const py::handle& h : py::iter(items_obj)) {
    py::tuple t = py::reinterpret_borrow<py::object>(h).cast<py::tuple>();
    if (t.size() != 6)
      throw std::invalid_argument("each item is (seq_id, tokens, start, ctx_len, write, out_idx)");
    Item it;
    try {
      it.seq = t[0].cast<int>();
      it.start = t[2].cast<int>();
      it.ctx_len = t[3].cast<int>();
      it.write = t[4].cast<bool>();
    } catch (const py::cast_error&) {
      throw std::invalid_argument(
          "each item is (seq_id: int, tokens, start: int, ctx_len: int, write: bool, out_idx) with int32 values");
    }
    it.tokens = int_vec(t[1], "tokens");
    it.out_idx = int_vec(t[5], "out_idx");
    items.push_back(std::move(it));
  }
  return items;
}

}  // namespace

static int64_t count_out(const std::vector<Item>& items) {
  int64_t n = 0;
  for (const Item& it : items) n += (int64_t)it.out_idx.size();
  return n;
}

void register_smallops(py::module_& m);
void register_attention(py::module_& m);

void register_model(py::module_& m) {
  py::register_exception<KvBudgetError>(m, "KvBudgetError", PyExc_MemoryError);

  py::class_<PyModel>(m, "Model")
      .def(py::init([](py::buffer buffer, py::dict meta, py::dict tensors, int64_t kv_budget_bytes,
                       const std::string& kv_dtype) {
             auto pm = std::make_unique<PyModel>();
             pm->buf = std::make_unique<py::buffer_info>(buffer.request());
             const uint8_t* base = static_cast<const uint8_t*>(pm->buf->ptr);
             const int64_t size = (int64_t)pm->buf->size * pm->buf->itemsize;
             Config c;
             c.hidden = meta_get<int>(meta, "hidden_size");
             c.layers = meta_get<int>(meta, "num_hidden_layers");
             c.heads = meta_get<int>(meta, "num_attention_heads");
             c.kv_heads = meta_get<int>(meta, "num_key_value_heads");
             c.head_dim = meta_get<int>(meta, "head_dim");
             c.inter = meta_get<int>(meta, "intermediate_size");
             c.vocab = meta_get<int>(meta, "vocab_size");
             c.rope_theta = meta_get<double>(meta, "rope_theta");
             c.eps = meta_get<float>(meta, "rms_norm_eps");
             c.tied = meta_get<bool>(meta, "tie_word_embeddings");
             if (meta.contains("hidden_act") && meta["hidden_act"].cast<std::string>() != "relu2")
               throw std::invalid_argument("unsupported hidden_act " + meta["hidden_act"].cast<std::string>());
             std::string head = "f16", embed = "f16";
             if (meta.contains("quant")) {
               py::dict q = meta["quant"].cast<py::dict>();
               if (q.contains("lm_head")) head = q["lm_head"].cast<std::string>();
               if (q.contains("embedding")) embed = q["embedding"].cast<std::string>();
               if (q.contains("weights") && q["weights"].cast<std::string>() != "i2_b128")
                 throw std::invalid_argument("unsupported weight quantization " + q["weights"].cast<std::string>());
             }
             if (head != "f16" && head != "i8") throw std::invalid_argument("unsupported lm_head type " + head);
             c.lm_head_i8 = head == "i8";
             if (embed != "f16" && embed != "i8") throw std::invalid_argument("unsupported embedding type " + embed);
             c.embed_i8 = embed == "i8";
             if (kv_dtype != "f16" && kv_dtype != "f32")
               throw std::invalid_argument("kv_dtype must be 'f16' or 'f32', got " + kv_dtype);

             std::map<std::string, TensorRef> refs;
             for (auto kv : tensors) {
               const std::string name = kv.first.cast<std::string>();
               py::tuple t = py::reinterpret_borrow<py::object>(kv.second).cast<py::tuple>();
               if (t.size() != 4) throw std::invalid_argument(name + ": expected (offset, dtype, shape, scale)");
               TensorRef r;
               const int64_t off = t[0].cast<int64_t>();
               r.dtype = t[1].cast<std::string>();
               r.shape = t[2].cast<std::vector<int64_t>>();
               r.scale = t[3].is_none() ? 0.f : t[3].cast<float>();
               int64_t elems = 1;
               for (int64_t d : r.shape) {
                 if (d < 0) throw std::invalid_argument(name + ": negative dimension");
                 elems *= d;
               }
               int64_t nbytes;
               if (r.dtype == "f16") nbytes = elems * 2;
               else if (r.dtype == "f32") nbytes = elems * 4;
               else if (r.dtype == "i8") nbytes = elems;
               else if (r.dtype == "i2_b128") {
                 if (r.shape.size() != 2) throw std::invalid_argument(name + ": i2_b128 tensors are 2-D");
                 nbytes = r.shape[0] * pad_k(r.shape[1]) / 4;
               } else
                 nbytes = 0;  // unknown dtypes are only rejected if the model needs them
               if (off < 0 || off + nbytes > size)
                 throw std::invalid_argument(name + ": bytes [" + std::to_string(off) + ", " +
                                             std::to_string(off + nbytes) + ") outside the buffer of " +
                                             std::to_string(size) + " bytes");
               if ((r.dtype == "f32" && off % 4) || (r.dtype == "f16" && off % 2))
                 throw std::invalid_argument(name + ": misaligned offset " + std::to_string(off));
               r.data = base + off;
               refs[name] = r;
             }
             pm->model = std::make_unique<Model>(c, refs, kv_budget_bytes, kv_dtype == "f16");
             return pm;
           }),
           py::arg("buffer"), py::arg("meta"), py::arg("tensors"), py::arg("kv_budget_bytes"),
           py::arg("kv_dtype") = "f16",
           "Model over a buffer (the mmapped .bin); tensors: name -> (offset, dtype, shape, scale)")
      .def(
          "alloc_seq",
          [](PyModel& s, int64_t capacity) {
            py::gil_scoped_release nogil;
            return s.model->alloc_seq(capacity);
          },
          py::arg("capacity"), "New sequence with a KV cache of `capacity` positions; MemoryError past the budget")
      .def(
          "free_seq",
          [](PyModel& s, int id) {
            py::gil_scoped_release nogil;
            s.model->free_seq(id);
          },
          py::arg("seq_id"))
      // Everything below that takes the model mutex releases the GIL first:
      // a forward holds that mutex, and waiting for it with the GIL held would
      // stall every Python thread (the server's event loop) for a whole forward.
      .def("kv_bytes_used", [](PyModel& s) { return s.model->kv_bytes_used(); },
           py::call_guard<py::gil_scoped_release>())
      .def("kv_bytes_kept", [](PyModel& s) { return s.model->kv_bytes_kept(); },
           py::call_guard<py::gil_scoped_release>(),
           "Bytes of freed sequences' caches kept committed for the next sequences (they count "
           "against the budget and are released when a new sequence needs their room)")
      .def("kv_zero_filled", [](PyModel& s) { return s.model->kv_zero_filled(); },
           py::call_guard<py::gil_scoped_release>(),
           "Cache positions (per sequence) zeroed because a forward read them before any write; "
           "the engine reads only what it wrote: 0")
      .def("kv_bytes_per_token", [](PyModel& s) { return s.model->kv_bytes_per_token(); })
      .def_property_readonly("kv_dtype", [](PyModel& s) { return s.model->kv_f16() ? "f16" : "f32"; })
      .def("set_profile", [](PyModel& s, bool on) { s.model->set_profile(on); }, py::arg("on"),
           py::call_guard<py::gil_scoped_release>(),
           "Per-phase timing of forwards on/off (also BITDLM_PROFILE=1 at load)")
      .def(
          "profile",
          [](PyModel& s) {
            std::vector<std::pair<std::string, double>> phases;
            int64_t calls;
            {
              py::gil_scoped_release nogil;
              phases = s.model->profile();
              calls = s.model->profiled_calls();
            }
            py::dict d;
            for (auto& [name, sec] : phases) d[py::str(name)] = sec;
            return py::make_tuple(d, calls);
          },
          "(seconds per phase, forward calls) since the last reset_profile()")
      .def("reset_profile", [](PyModel& s) { s.model->reset_profile(); },
           py::call_guard<py::gil_scoped_release>())
      .def_property(
          "threads", [](PyModel& s) { return s.threads.load(); },
          [](PyModel& s, int n) {
            if (n < 0) throw std::invalid_argument("threads must be >= 0 (0 = the calling thread's OpenMP setting)");
            if (n > kMaxThreads)
              throw std::invalid_argument("threads must be <= " + std::to_string(kMaxThreads) + ", got " +
                                          std::to_string(n));
            s.threads = n;
          },
          "OpenMP threads of every forward, set on the calling thread at the start of each call (0 = as set there)")
      .def_property_readonly(
          "forward_threads", [](PyModel& s) { return s.forward_threads.load(); },
          "omp_get_max_threads() on the thread that ran the last forward, after `threads` was applied")
      .def_property_readonly("profiling", [](PyModel& s) { return s.model->profiling(); })
      .def(
          "forward",
          [](PyModel& s, py::object items_obj, int block_size, const std::string& mode, py::object temperature,
             py::object top_p, py::object uniforms, py::object banned) -> py::object {
            std::vector<Item> items = parse_items(items_obj);
            const int64_t V = s.model->config().vocab;
            const int64_t n_out = count_out(items);  // (the forward validates the items)
            if (mode == "logits") {
              py::array_t<float> out({n_out, V});
              float* p = out.mutable_data();
              {
                py::gil_scoped_release nogil;
                s.apply_threads();
                s.model->forward_logits(items, block_size, p);
              }
              return std::move(out);
            }
            if (mode != "select") throw std::invalid_argument("mode must be 'logits' or 'select', got '" + mode + "'");
            SelectArgs sel;
            sel.temperature = per_row(temperature, n_out, 0.f, "temperature");
            sel.top_p = per_row(top_p, n_out, 1.f, "top_p");
            bool sampling = false;
            for (int64_t i = 0; i < n_out; ++i) {
              const float t = sel.temperature[i], p = sel.top_p[i];
              if (!(t >= 0.f) || !std::isfinite(t)) throw std::invalid_argument("temperature must be finite and >= 0");
              if (!(p > 0.f && p <= 1.f)) throw std::invalid_argument("top_p must be in (0, 1]");
              sampling |= t > 0.f;
            }
            if (sampling && uniforms.is_none())
              throw std::invalid_argument("uniforms are required when a temperature is > 0");
            sel.uniform = per_row(uniforms, n_out, 0.f, "uniforms");
            for (float u : sel.uniform)
              if (!(u >= 0.f && u < 1.f)) throw std::invalid_argument("uniforms must be in [0, 1)");
            if (!banned.is_none()) sel.banned = int_vec(banned, "banned");
            py::array_t<int32_t> tok(n_out);
            py::array_t<float> conf(n_out);
            int32_t* tp = tok.mutable_data();
            float* cp = conf.mutable_data();
            {
              py::gil_scoped_release nogil;
              s.apply_threads();
              s.model->forward_select(items, block_size, sel, tp, cp);
            }
            return py::make_tuple(tok, conf);
          },
          py::arg("items"), py::arg("block_size"), py::arg("mode") = "logits", py::arg("temperature") = py::none(),
          py::arg("top_p") = py::none(), py::arg("uniforms") = py::none(), py::arg("banned") = py::none(),
          "One forward for all items (seq_id, tokens, start, ctx_len, write, out_idx); see docs/architecture.md")
      .def(
          "forward_trace",
          [](PyModel& s, py::object items_obj, int block_size) {
            std::vector<Item> items = parse_items(items_obj);
            py::array_t<float> out({count_out(items), (int64_t)s.model->config().vocab});
            ActTrace trace;
            {
              float* p = out.mutable_data();
              py::gil_scoped_release nogil;
              s.apply_threads();
              s.model->forward_logits(items, block_size, p, &trace);
            }
            py::list ops;
            for (const ActTrace::Op& op : trace.ops) {
              py::array_t<int8_t> codes({op.rows, op.K});
              std::copy(op.codes.begin(), op.codes.end(), codes.mutable_data());
              py::array_t<float> scales(op.rows);
              std::copy(op.scales.begin(), op.scales.end(), scales.mutable_data());
              ops.append(py::make_tuple(op.layer, op.name, codes, scales));
            }
            return py::make_tuple(out, ops);
          },
          py::arg("items"), py::arg("block_size"),
          "Diagnostics (scripts/logit_diag.py): forward(mode='logits') plus every activation quantization's "
          "(layer, op, codes [rows, K] int8, scales [rows]) in computation order");
  register_smallops(m);  // csrc/model/bind_smallops.cpp (tests of the per-ISA small ops)
  register_attention(m);  // csrc/model/bind_attention.cpp (attention alone: tests, bench/kernels.py)
}

}  // namespace bitdlm
