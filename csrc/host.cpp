// fastasam._host: the warm step's one pass over the tensors, in C++ (CPU only; built wherever PyTorch is).
//
// fastasam/_watch.py says what a phase confirms before its kernels read tensors through addresses recorded when the
// step plan was built; its Python version makes map calls over the tensors, this one reads the same fields straight
// from the tensors. The two are interchangeable and tested against each other.

#include <Python.h>
#include <pybind11/pybind11.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

// The tensor behind a Python tensor object (the caller guarantees that it is one: Watch keeps its own lists).
inline const c10::TensorImpl* impl_of(PyObject* obj) {
  return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

// Where a tensor's elements are: its storage's allocation and its offset in elements (equal pairs, equal addresses:
// a tensor's dtype cannot change in place, and a gradient's is its parameter's). Read straight from the fields,
// with none of data()'s checks: a few loads. {nullptr, -1}: no storage (sparse and the like).
struct Where {
  const void* base;
  int64_t offset;
  bool operator==(const Where& o) const { return base == o.base && offset == o.offset; }
  bool operator!=(const Where& o) const { return !(*this == o); }
};

inline Where where(const c10::TensorImpl* t) {
  const c10::StorageImpl* s = t->unsafe_storage().unsafeGetStorageImpl();
  if (s == nullptr) return {nullptr, -1};
  return {s->data_ptr().get(), t->storage_offset()};
}

// A parameter's memory as a kernel reaches it: where it is, its element count and dtype. Equal records: a kernel
// that writes numel elements of this dtype from the recorded address writes exactly the parameter's elements (a
// parameter whose data was replaced by a smaller or converted tensor that happens to sit at the old address differs).
struct Extent {
  Where at;
  int64_t numel;
  caffe2::TypeMeta dtype;
  bool operator==(const Extent& o) const { return at == o.at && numel == o.numel && dtype == o.dtype; }
  bool operator!=(const Extent& o) const { return !(*this == o); }
};

inline Extent extent(const c10::TensorImpl* t) { return {where(t), t->numel(), t->dtype()}; }

// The tensor behind a gradient, or nullptr where there is none.
inline const c10::TensorImpl* grad_of(const c10::TensorImpl* param) {
  const c10::TensorImpl* g = param->grad().unsafeGetTensorImpl();
  return g == c10::UndefinedTensorImpl::singleton() ? nullptr : g;
}

std::vector<PyObject*> tensors_of(const py::list& items, const char* what) {
  std::vector<PyObject*> out;
  out.reserve(items.size());
  for (py::handle h : items) {
    if (!THPVariable_Check(h.ptr())) throw py::type_error(std::string("fastasam._host.Watch: ") + what +
                                                          " must hold tensors only");
    out.push_back(h.ptr());
  }
  return out;
}

// A dict's entries as they are now. Equal snapshots: no entry was added, removed or given another object. Where
// CPython keeps a version tag that every change to a dict moves (3.13 and before), the snapshot is that tag (a
// load); elsewhere, the size and each (key, value) object in order. The snapshot holds references to the dict and
// to every key and value, so no object it names can be freed and another take its address.
#if PY_VERSION_HEX < 0x030E0000
#define FASTASAM_DICT_VERSION 1
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
inline uint64_t dict_version(PyObject* d) { return reinterpret_cast<PyDictObject*>(d)->ma_version_tag; }
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#else
#define FASTASAM_DICT_VERSION 0
#endif

struct Entries {
  py::object dict;
  std::vector<std::pair<PyObject*, PyObject*>> items;
  py::list refs;
#if FASTASAM_DICT_VERSION
  uint64_t version;
#endif

  explicit Entries(PyObject* d) : dict(py::reinterpret_borrow<py::object>(d)) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
      items.emplace_back(k, v);
      refs.append(py::reinterpret_borrow<py::object>(k));
      refs.append(py::reinterpret_borrow<py::object>(v));
    }
#if FASTASAM_DICT_VERSION
    version = dict_version(d);
#endif
  }
  bool same() const {
    PyObject* d = dict.ptr();
#if FASTASAM_DICT_VERSION
    return dict_version(d) == version;
#else
    if (PyDict_GET_SIZE(d) != static_cast<Py_ssize_t>(items.size())) return false;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    for (const auto& kv : items)
      if (!PyDict_Next(d, &pos, &k, &v) || k != kv.first || v != kv.second) return false;
    return true;
#endif
  }
};

// Watch: the kernel tensors' gradient addresses and layouts as they are now, and which tensors must (or must not)
// have a gradient; check() confirms that nothing moved. Same contract as fastasam._watch.PyWatch (see there).
// A kernel tensor's check reads its record and four objects: the parameter's Python object (which tensor it holds
// now: torch.utils.swap_tensors can change it), the parameter, its gradient, the gradient's storage.
// With a base optimizer's state (the fused update's watch): the state dict's entries, each kernel tensor's own state
// dict's entries and the layout of the state tensors its table row names, as they are now (state_intact()).
class Watch {
 public:
  Watch(py::list params, py::list absent, int64_t n_kernel, int64_t n_contiguous, int64_t n_plain,
        bool check_params, py::object state, py::list state_tensors)
      : params_(copy(params)), absent_(copy(absent)), n_kernel_(n_kernel), n_contiguous_(n_contiguous),
        check_params_(check_params), state_(state) {
    const std::vector<PyObject*> items = tensors_of(params_, "params");
    absent_items_ = tensors_of(absent_, "absent");
    const auto n = static_cast<int64_t>(items.size());
    // the layout _watch.watch passes: kernel tensors (contiguous first), other plain tensors, then DTensors
    if (n_contiguous < 0 || n_contiguous > n_kernel || n_kernel > n_plain || n_plain > n)
      throw py::value_error("fastasam._host.Watch: need 0 <= n_contiguous <= n_kernel <= n_plain <= len(params)");
    kernel_.reserve(n_kernel);
    for (int64_t i = 0; i < n_kernel; ++i) {
      const c10::TensorImpl* p = impl_of(items[i]);
      const c10::TensorImpl* g = grad_of(p);
      if (g == nullptr) throw py::value_error("fastasam._host.Watch: a kernel tensor has no gradient");
      kernel_.push_back({items[i], extent(g), check_params ? extent(p) : Extent{{nullptr, -1}, -1, caffe2::TypeMeta()}});
      if (i >= n_contiguous) {
        auto s = g->strides();
        strides_.emplace_back(s.begin(), s.end());
      }
    }
    for (int64_t i = n_kernel; i < n; ++i) {
      rest_.push_back(items[i]);
      const c10::TensorImpl* g = grad_of(impl_of(items[i]));
      if (g == nullptr) throw py::value_error("fastasam._host.Watch: a tensor expected to have a gradient has none");
      rest_grad_.push_back({g->numel(), g->dtype()});
    }
    if (check_params)
      for (int64_t i = n_kernel; i < n_plain; ++i) rest_at_.push_back(extent(impl_of(items[i])));
    if (!state_.is_none()) {
      if (!PyDict_Check(state_.ptr())) throw py::type_error("fastasam._host.Watch: state must be a dict");
      if (static_cast<int64_t>(state_tensors.size()) != n_kernel)
        throw py::value_error("fastasam._host.Watch: state_tensors needs one entry per kernel tensor");
      state_entries_.emplace_back(state_.ptr());
      for (int64_t i = 0; i < n_kernel; ++i) {
        PyObject* own = PyDict_GetItemWithError(state_.ptr(), items[i]);  // borrowed; Entries keeps a reference
        if (own == nullptr) {
          if (PyErr_Occurred()) throw py::error_already_set();
          throw py::value_error("fastasam._host.Watch: a kernel tensor has no entry in the state");
        }
        if (!PyDict_Check(own)) throw py::type_error("fastasam._host.Watch: a kernel tensor's state must be a dict");
        state_entries_.emplace_back(own);
        for (PyObject* t : tensors_of(py::list(state_tensors[i]), "state_tensors")) {
          state_refs_.append(py::reinterpret_borrow<py::object>(t));
          state_items_.push_back({t, impl_of(t)->unsafe_storage()});
        }
      }
    }
  }

  // Whether the base optimizer's state is as recorded: the same entries in the state dict and in each kernel
  // tensor's own state dict, and each state tensor the tables name on the storage it had (replacing it through
  // .data or set_ gives the tensor another). True without a state. The recorded storages are held, so none can be
  // freed and another take its address.
  bool state_intact() const {
    for (const Entries& e : state_entries_)
      if (!e.same()) return false;
    for (const StateTensor& st : state_items_)
      if (impl_of(st.tensor)->unsafe_storage().unsafeGetStorageImpl() != st.storage.unsafeGetStorageImpl())
        return false;
    return true;
  }

  // Whether every parameter (all but the DTensors) is where it was and as large: the kernels' tables still point at
  // the parameters' current memory. Only for a watch made with check_params (else true). check() also answers None
  // when a parameter moved; this says whether that was the reason.
  bool params_intact() const {
    if (!check_params_) return true;
    for (const Kernel& k : kernel_)
      if (extent(impl_of(k.param)) != k.param_at) return false;
    for (size_t i = 0; i < rest_at_.size(); ++i)
      if (extent(impl_of(rest_[i])) != rest_at_[i]) return false;
    return true;
  }

  // The gradients of the tensors after the kernel ones (a list, in order) when nothing moved, else None.
  py::object check() const {
    for (int64_t i = 0; i < n_kernel_; ++i) {
      const Kernel& k = kernel_[i];
      const c10::TensorImpl* p = impl_of(k.param);
      if (check_params_ && extent(p) != k.param_at) return py::none();
      const c10::TensorImpl* g = grad_of(p);
      if (g == nullptr || extent(g) != k.grad_at) return py::none();
      if (i < n_contiguous_) {
        if (!g->is_contiguous()) return py::none();
      } else if (g->strides() != c10::IntArrayRef(strides_[i - n_contiguous_])) {
        return py::none();
      }
    }
    if (check_params_)
      for (size_t i = 0; i < rest_at_.size(); ++i)
        if (extent(impl_of(rest_[i])) != rest_at_[i]) return py::none();
    for (PyObject* a : absent_items_)
      if (grad_of(impl_of(a)) != nullptr) return py::none();
    if (!state_entries_.empty() && !state_intact()) return py::none();
    const auto m = static_cast<Py_ssize_t>(rest_.size());
    py::list out(m);
    for (Py_ssize_t i = 0; i < m; ++i) {
      const at::Tensor& g = impl_of(rest_[i])->grad();
      if (!g.defined() || g.numel() != rest_grad_[i].first || g.dtype() != rest_grad_[i].second) return py::none();
      PyObject* wrapped = THPVariable_Wrap(g);  // the gradient's own Python object (a new reference)
      if (wrapped == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(out.ptr(), i, wrapped);
    }
    return std::move(out);
  }

  int64_t size() const { return static_cast<int64_t>(PyList_GET_SIZE(params_.ptr()) + absent_items_.size()); }

 private:
  struct Kernel {
    PyObject* param;
    Extent grad_at;
    Extent param_at;
  };
  // Copies of the caller's lists, which nothing else can change: they keep the objects the raw pointers name alive.
  static py::list copy(const py::list& items) {
    return py::reinterpret_steal<py::list>(PySequence_List(items.ptr()));
  }
  py::list params_, absent_;
  std::vector<Kernel> kernel_;
  std::vector<PyObject*> rest_, absent_items_;
  std::vector<std::pair<int64_t, caffe2::TypeMeta>> rest_grad_;  // the other tensors' gradients: elements and dtype
  std::vector<Extent> rest_at_;
  int64_t n_kernel_, n_contiguous_;
  bool check_params_;
  std::vector<std::vector<int64_t>> strides_;
  py::object state_;
  py::list state_refs_;  // the state tensors, which state_items_ names
  std::vector<Entries> state_entries_;  // the state dict, then each kernel tensor's own state dict
  struct StateTensor {
    PyObject* tensor;
    c10::Storage storage;
  };
  std::vector<StateTensor> state_items_;  // the state tensors, row by row, and their storages
};

// Whether the "params" lists of `groups` (param-group dicts), laid end to end, hold exactly the objects of
// `expected`, in order: the step plan's identity pass.
bool same_params(const py::list& groups, const py::list& expected) {
  py::str key("params");
  const Py_ssize_t total = PyList_GET_SIZE(expected.ptr());
  Py_ssize_t k = 0;
  for (py::handle group : groups) {
    py::object ps;
    if (PyDict_CheckExact(group.ptr())) {
      PyObject* found = PyDict_GetItemWithError(group.ptr(), key.ptr());  // borrowed
      if (found == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return false;  // the rebuild that follows says what is wrong
      }
      ps = py::reinterpret_borrow<py::object>(found);
    } else {
      PyObject* found = PyObject_GetItem(group.ptr(), key.ptr());  // a new reference
      if (found == nullptr) {
        PyErr_Clear();
        return false;
      }
      ps = py::reinterpret_steal<py::object>(found);
    }
    py::object seq = py::reinterpret_steal<py::object>(PySequence_Fast(ps.ptr(), "params"));
    if (!seq) {
      PyErr_Clear();
      return false;
    }
    const Py_ssize_t m = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    if (k + m > total) return false;
    for (Py_ssize_t i = 0; i < m; ++i, ++k)
      if (items[i] != PyList_GET_ITEM(expected.ptr(), k)) return false;
  }
  return k == total;
}

}  // namespace

PYBIND11_MODULE(_host, m) {
  m.doc() = "fastasam's warm-step pass over the tensors, in C++ (see fastasam/_watch.py)";
  py::class_<Watch>(m, "Watch")
      .def(py::init<py::list, py::list, int64_t, int64_t, int64_t, bool, py::object, py::list>(), py::arg("params"),
           py::arg("absent"), py::arg("n_kernel"), py::arg("n_contiguous"), py::arg("n_plain"),
           py::arg("check_params"), py::arg("state") = py::none(), py::arg("state_tensors") = py::list())
      .def("check", &Watch::check)
      .def("params_intact", &Watch::params_intact)
      .def("state_intact", &Watch::state_intact)
      .def("__len__", &Watch::size);
  m.def("same_params", &same_params, py::arg("groups"), py::arg("expected"));
}
