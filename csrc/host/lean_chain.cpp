// ttkernels._lean: the grad-mode lean path of TTLinear for an in-then-out chain of cores, as one C++ autograd
// node. Python's ttkernels/lean.py holds the same algorithm as an autograd.Function (the fallback where this
// module is not built) and documents it; the two are tested against each other and against float64.
//
// A Plan holds, for one version of the cores, the factors A (d_in, r) and B (r, d_out) with scaling folded into
// As and Bs, and per core beyond the first of each side what its gradient needs. Plan.forward computes
// y = x W^T + b + x As B; in grad mode it attaches one node (TTLinearLeanBackward) whose backward gives dx, the
// weight's and bias' gradients when wanted, and each core's gradient from dA = x^T dS and dB = S^T dY, with no
// Python and no graph of the factors. Under create_graph=True the node recomputes the layer from its inputs with
// differentiable ops and returns torch.autograd.grad of that, so double backward is exact.
//
// The plan holds its cores weakly (weak TensorImpl pointers, version counters and storages): a kept plan must not
// pin the layer's Parameters from C++, where Python's garbage collector cannot see the reference (a cycle through
// a core would never be collected). A node holds its cores strongly for as long as its graph lives, as torch's own
// nodes hold the leaves they saved.

#include <torch/extension.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

namespace ta = torch::autograd;
using at::Tensor;

// torch's node pointer: std::shared_ptr in older releases, c10::intrusive_ptr in newer ones.
using NodePtr = std::decay_t<decltype(std::declval<const at::TensorBase&>().grad_fn())>;

template <class T>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<ta::Node>>) {
    return std::shared_ptr<T>(new T());
  } else {
    return c10::make_intrusive<T>();
  }
}

struct Step {
  int64_t k;        // the core
  Tensor left;      // in side: P_{k-1}^T; out side: Q_{k+1}
  Tensor right;     // in side: G_k as (r_{k-1}, s_k r_k); out side: G_k^T as (r_k, r_{k-1} s_k)
  int64_t rows, cols;  // the view of the incoming gradient this step takes
  std::vector<int64_t> shape;  // the core's shape
};

// Core k of K seen as a matrix: (s_0, r_1) for the first, (r_{k-1}, s_k r_k) for the other in cores, (r_{k-1} s_k,
// r_k) for the out cores but the last, (r, s) for the last. A view: detached for a plan, differentiable for a
// recomputation.
Tensor as_matrix(const Tensor& c, int64_t k, int64_t K, int64_t last_in) {
  const int64_t r0 = c.size(0), s = c.size(1), r1 = c.size(2);
  if (k == 0) return c.view({s, r1});
  if (k <= last_in) return c.view({r0, s * r1});
  if (k < K - 1) return c.view({r0 * s, r1});
  return c.view({r0, s});
}

// A (d_in, r), the product of the in cores' matrices, and B (r, d_out), of the out cores'. With a_steps and
// b_steps, also what backward needs per core beyond the first of each side, in the order backward walks them.
std::pair<Tensor, Tensor> sides(const std::vector<Tensor>& mats, const std::vector<Tensor>& cores, int64_t last_in,
                                std::vector<Step>* a_steps = nullptr, std::vector<Step>* b_steps = nullptr) {
  const auto K = static_cast<int64_t>(cores.size());
  Tensor P = mats[0];
  for (int64_t k = 1; k <= last_in; ++k) {
    const auto& c = cores[k];
    if (a_steps) a_steps->push_back({k, P.t(), mats[k], P.size(0), mats[k].size(1), c.sizes().vec()});
    P = at::mm(P, mats[k]).view({-1, c.size(2)});
  }
  Tensor Q = mats[K - 1];
  for (int64_t k = K - 2; k > last_in; --k) {
    const auto& c = cores[k];
    if (b_steps) b_steps->push_back({k, Q, mats[k].t(), mats[k].size(0), Q.size(1), c.sizes().vec()});
    Q = at::mm(mats[k], Q).view({c.size(0), -1});
  }
  if (a_steps) std::reverse(a_steps->begin(), a_steps->end());  // backward walks from the last in core down
  if (b_steps) std::reverse(b_steps->begin(), b_steps->end());  // and from the first out core up
  return {P, Q};
}

class Plan : public std::enable_shared_from_this<Plan> {
 public:
  Plan(const std::vector<Tensor>& cores, int64_t last_in, double scaling)
      : last_in_(last_in), scaling_(scaling) {
    const auto K = static_cast<int64_t>(cores.size());
    TORCH_CHECK(K >= 2 && last_in >= 0 && last_in < K - 1, "lean Plan: need at least one in and one out core");
    at::NoGradGuard no_grad;
    std::vector<Tensor> mats;
    mats.reserve(K);
    for (int64_t k = 0; k < K; ++k) {
      const auto& c = cores[k];
      TORCH_CHECK(c.dim() == 3 && c.is_contiguous() && c.scalar_type() == cores[0].scalar_type(),
                  "lean Plan: cores must be contiguous 3-d tensors of one dtype");
      mats.push_back(as_matrix(c.detach(), k, K, last_in));  // shares the storage and the version counter
      versions_.push_back(c._version());
      ptrs_.push_back(c.data_ptr());
      weak_.emplace_back(c.getIntrusivePtr());
    }
    std::tie(A_, B_) = sides(mats, cores, last_in, &a_steps_, &b_steps_);
    As_ = scaling == 1.0 ? A_ : A_ * scaling;
    Bs_ = scaling == 1.0 ? B_ : B_ * scaling;
  }

  // The cores, or an empty vector when one of them no longer exists.
  std::vector<Tensor> cores() const {
    std::vector<Tensor> out;
    out.reserve(weak_.size());
    for (const auto& w : weak_) {
      auto impl = w.lock();
      if (!impl) return {};
      out.emplace_back(std::move(impl));
    }
    return out;
  }

  // True while every core is the one (storage and in-place version) this plan was built from, at this scaling.
  bool fresh(double scaling) const {
    if (scaling != scaling_) return false;
    const auto cs = cores();
    if (cs.empty()) return false;
    for (size_t k = 0; k < cs.size(); ++k) {
      if (cs[k]._version() != versions_[k] || cs[k].data_ptr() != ptrs_[k]) return false;
    }
    return true;
  }

  Tensor forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias);

  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> weak_;
  std::vector<int64_t> versions_;
  std::vector<const void*> ptrs_;
  int64_t last_in_;
  double scaling_;
  Tensor A_, B_, As_, Bs_;
  std::vector<Step> a_steps_, b_steps_;
};

struct LeanBackward : public ta::Node {
  std::shared_ptr<Plan> plan;
  std::vector<Tensor> cores;  // held while the graph lives
  ta::SavedVariable x_, S_;
  Tensor weight;  // held, not saved: its version is checked only when dx needs it
  int64_t weight_version = 0;
  Tensor bias;

  std::string name() const override { return "TTLinearLeanBackward"; }
  void compiled_args(ta::CompiledNodeArgs&) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
        "compiled autograd cannot trace TTLinearLeanBackward, the C++ node of ttkernels' lean path: turn compiled "
        "autograd on before the forward (torch._dynamo.config.compiled_autograd = True, or the forward inside "
        "torch._dynamo.compiled_autograd._enable(...)), where TTLinear records torch ops, or set "
        "ttkernels.lean.NATIVE = None (TTKERNELS_LEAN_NATIVE=0) to use the Python node");
  }
  void release_variables() override {
    x_.reset_data();
    S_.reset_data();
  }

  [[noreturn]] void refuse_changed() const {
    std::ostringstream what;
    int64_t now = weight._version(), then = weight_version;
    std::string which = "the base weight";
    for (size_t k = 0; k < cores.size(); ++k) {
      if (cores[k]._version() != plan->versions_[k]) {
        which = "cores[" + std::to_string(k) + "]";
        now = cores[k]._version();
        then = plan->versions_[k];
        break;
      }
    }
    TORCH_CHECK(false, "one of the variables needed for gradient computation has been modified by an inplace "
                "operation: ", which, " of the TTLinear is at version ", now, "; expected version ", then,
                " instead (run backward before an optimizer step or another in-place change)");
  }

  ta::variable_list apply(ta::variable_list&& grads) override {
    const size_t K = cores.size();
    ta::variable_list out(3 + K);
    const bool need_x = task_should_compute_output(0);
    for (size_t k = 0; k < K; ++k) {
      if (cores[k]._version() != plan->versions_[k]) refuse_changed();
    }
    if (need_x && weight._version() != weight_version) refuse_changed();
    Tensor x = x_.unpack();
    Tensor S = S_.unpack();
    Tensor dy = grads[0];
    if (!dy.defined()) return out;
    if (ta::GradMode::is_enabled()) return recomputed(x, dy);
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor x2 = x;
    if (dy.dim() != 2) {
      dy = dy.reshape({-1, dy.size(-1)});
      x2 = x.reshape({-1, x.size(-1)});
    }
    dy = dy.contiguous();  // the gradient of a sum is an expanded tensor: one copy, not one per matmul
    Tensor dS = at::linear(dy, plan->Bs_);  // dy Bs^T
    if (need_x) {
      Tensor dx = at::linear(dS, plan->A_).addmm_(dy, weight);  // dS A^T + dy W
      out[0] = x.dim() != 2 ? dx.view(x.sizes()) : dx;
    }
    if (task_should_compute_output(1)) out[1] = at::mm(dy.t(), x2);
    if (task_should_compute_output(2)) out[2] = dy.sum(0);
    bool any_core = false;
    for (size_t k = 0; k < K; ++k) any_core = any_core || task_should_compute_output(3 + k);
    if (!any_core) return out;
    Tensor dP = at::mm(x2.t(), dS);  // dA
    for (const auto& st : plan->a_steps_) {
      Tensor dPv = dP.view({st.rows, st.cols});
      out[3 + st.k] = at::mm(st.left, dPv).view(st.shape);
      dP = at::linear(dPv, st.right);  // dPv G^T
    }
    out[3] = dP.view(cores[0].sizes());
    Tensor dQ = at::mm(S.t(), dy);  // dB (S is x As, scaling included)
    for (const auto& st : plan->b_steps_) {
      Tensor dQv = dQ.view({st.rows, st.cols});
      out[3 + st.k] = at::linear(dQv, st.left).view(st.shape);  // dQv Q^T
      dQ = at::mm(st.right, dQv);
    }
    out[3 + K - 1] = dQ.view(cores[K - 1].sizes());
    for (size_t k = 0; k < K; ++k) {
      if (!task_should_compute_output(3 + k)) out[3 + k] = Tensor();
    }
    return out;
  }

  // create_graph=True: the layer recomputed from the node's inputs with differentiable ops, differentiated.
  // The recomputation starts from aliases (differentiable views) of the inputs, so the inner grad stops there:
  // the inputs' own hooks and retain_grad run once, in the outer backward, and the returned gradients still reach
  // the inputs through the aliases for higher derivatives.
  ta::variable_list recomputed(const Tensor& x_in, const Tensor& dy) {
    std::vector<Tensor> all{x_in, weight, bias};
    all.insert(all.end(), cores.begin(), cores.end());
    for (auto& t : all) {
      if (t.defined()) t = t.view_as(t);
    }
    const Tensor& x = all[0];
    const Tensor& w = all[1];
    const Tensor& b = all[2];
    const std::vector<Tensor> cores(all.begin() + 3, all.end());
    const int64_t K = static_cast<int64_t>(cores.size()), last_in = plan->last_in_;
    std::vector<Tensor> mats;
    for (int64_t k = 0; k < K; ++k) mats.push_back(as_matrix(cores[k], k, K, last_in));
    const auto [P, Q] = sides(mats, cores, last_in);
    Tensor x2 = x.reshape({-1, x.size(-1)});
    Tensor y = at::linear(x2, w, b.defined() ? c10::optional<Tensor>(b) : c10::nullopt) +
               at::mm(at::mm(x2, P), Q) * plan->scaling_;
    ta::variable_list inputs;
    std::vector<size_t> slots;
    for (size_t i = 0; i < all.size(); ++i) {
      if (all[i].defined() && all[i].requires_grad() && task_should_compute_output(i)) {
        inputs.push_back(all[i]);
        slots.push_back(i);
      }
    }
    ta::variable_list out(all.size());
    if (inputs.empty()) return out;
    auto found = ta::grad({y}, inputs, {dy.reshape(y.sizes())}, /*retain_graph=*/true, /*create_graph=*/true,
                          /*allow_unused=*/true);
    for (size_t j = 0; j < slots.size(); ++j) out[slots[j]] = found[j];
    return out;
  }
};

Tensor Plan::forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  // inference mode records nothing, grad mode or not (as torch's own ops)
  const bool recording = ta::GradMode::is_enabled() && !c10::InferenceMode::is_enabled();
  std::vector<Tensor> cs;
  bool grad = false;
  if (recording) {
    cs = cores();
    TORCH_CHECK(!cs.empty(), "lean Plan.forward: a core of this plan no longer exists (build a new plan)");
    grad = x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad());
    for (const auto& c : cs) grad = grad || c.requires_grad();
  }
  Tensor S, y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
    S = at::mm(x2, As_);
    y = at::linear(x, weight, bias);
    (y.dim() == 2 ? y : y.view({-1, y.size(-1)})).addmm_(S, B_);
  }
  if (!grad) return y;
  NodePtr node = make_node<LeanBackward>();
  auto* n = static_cast<LeanBackward*>(node.get());
  n->set_next_edges(ta::collect_next_edges(x, weight, bias, at::ArrayRef<Tensor>(cs)));
  n->plan = shared_from_this();
  n->cores = std::move(cs);
  n->x_ = ta::SavedVariable(x, false);
  n->S_ = ta::SavedVariable(S, false);
  n->weight = weight;
  n->weight_version = weight._version();
  if (bias.has_value()) n->bias = *bias;
  ta::set_history(y, node);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "the grad-mode lean path of TTLinear as one C++ autograd node (see ttkernels/lean.py)";
  pybind11::class_<Plan, std::shared_ptr<Plan>>(m, "Plan")
      .def(pybind11::init<std::vector<Tensor>, int64_t, double>(), pybind11::arg("cores"), pybind11::arg("last_in"),
           pybind11::arg("scaling"))
      .def("fresh", &Plan::fresh, pybind11::arg("scaling"))
      .def("forward", &Plan::forward, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"))
      .def_property_readonly("A", [](const Plan& p) { return p.A_; })
      .def_property_readonly("B", [](const Plan& p) { return p.B_; })
      .def_property_readonly("As", [](const Plan& p) { return p.As_; })
      .def_property_readonly("Bs", [](const Plan& p) { return p.Bs_; })
      .def_property_readonly("cores", [](const Plan& p) { return p.cores(); })
      .def_property_readonly("versions", [](const Plan& p) { return p.versions_; })
      .def_property_readonly("scaling", [](const Plan& p) { return p.scaling_; });
}
