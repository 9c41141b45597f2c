// cnnkernels._C.ReplayPlan: a frozen model's recorded forward (cnnkernels/nn/frozen_plan.py)
// replayed in C++.
//
// frozen_plan records the ops one CPU call of a frozen model dispatches, each argument a
// constant, a slot (the input, an earlier op's output) or a list of those; its Python
// replay then calls every op through its Python binding, which parses the arguments
// anew per call. Here each step keeps its op's handle and its arguments already
// converted to the schema's types, and a call only fills the slots into a copy of the
// argument stack, calls the op boxed through the dispatcher (the same kernels, so the
// result is the Python replay's bit for bit) and releases the slots read for the last
// time. The GIL is released while the steps run.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

namespace cnnkernels {
namespace {

namespace py = pybind11;

// How one argument of a step is filled: a constant converted at recording, a slot, a
// list of tensors whose elements are slots or constants, or the schema's default.
enum class ArgKind : int64_t { kConstant = 0, kSlot = 1, kTensorList = 2, kDefault = 3 };

struct ListArg {
  size_t position;
  std::vector<int64_t> slots;           // -1 where the element is constants[i]
  std::vector<at::Tensor> constants;
};

struct Step {
  c10::OperatorHandle op;
  torch::jit::Stack arguments;          // constants and defaults in place; slots filled per call
  std::vector<std::pair<size_t, int64_t>> slot_args;
  std::vector<ListArg> list_args;
  std::vector<int64_t> out_slots;       // -1: an output nobody reads
  bool list_output;                     // the op returns one Tensor[] spread over out_slots
  std::vector<int64_t> released;
};

class ReplayPlan {
 public:
  ReplayPlan(int64_t n_slots, int64_t out_slot) : n_slots_(n_slots), out_slot_(out_slot) {
    TORCH_CHECK(n_slots > 0 && out_slot >= 0 && out_slot < n_slots, "ReplayPlan: bad slot counts");
  }

  // One recorded op: its qualified name and overload, per schema argument a kind and a
  // value (ArgKind), its output slots and the slots it reads for the last time.
  void add_step(const std::string& name, const std::string& overload, const std::vector<int64_t>& kinds,
                const py::list& values, std::vector<int64_t> out_slots, bool multiple,
                std::vector<int64_t> released) {
    auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const c10::FunctionSchema& schema = handle.schema();
    const auto& args = schema.arguments();
    TORCH_CHECK(kinds.size() == args.size() && values.size() == args.size(), "ReplayPlan: ", name,
                " takes ", args.size(), " arguments, got ", kinds.size());
    Step step{handle, {}, {}, {}, std::move(out_slots), false, std::move(released)};
    step.arguments.reserve(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      const py::handle value = values[i];
      switch (static_cast<ArgKind>(kinds[i])) {
        case ArgKind::kConstant:
          step.arguments.push_back(torch::jit::toIValue(value, args[i].real_type()));
          break;
        case ArgKind::kSlot:
          step.slot_args.emplace_back(i, check_slot(value.cast<int64_t>()));
          step.arguments.emplace_back();
          break;
        case ArgKind::kTensorList: {
          ListArg list{i, {}, {}};
          for (const py::handle element : value.cast<py::list>()) {
            if (py::isinstance<py::int_>(element)) {
              list.slots.push_back(check_slot(element.cast<int64_t>()));
              list.constants.emplace_back();
            } else {
              list.slots.push_back(-1);
              list.constants.push_back(element.cast<at::Tensor>());
            }
          }
          step.list_args.push_back(std::move(list));
          step.arguments.emplace_back();
          break;
        }
        case ArgKind::kDefault:
          TORCH_CHECK(args[i].default_value().has_value(), "ReplayPlan: ", name, "'s argument ", args[i].name(),
                      " has no default");
          step.arguments.push_back(*args[i].default_value());
          break;
        default:
          TORCH_CHECK(false, "ReplayPlan: unknown argument kind ", kinds[i]);
      }
    }
    const auto& returns = schema.returns();
    step.list_output = multiple && returns.size() == 1 && returns[0].type()->kind() == c10::TypeKind::ListType;
    const bool no_result = returns.empty() && !multiple && step.out_slots.size() == 1 && step.out_slots[0] == -1;
    TORCH_CHECK(no_result || (multiple ? (step.list_output || step.out_slots.size() == returns.size())
                                       : (step.out_slots.size() == 1 && returns.size() == 1)),
                "ReplayPlan: ", name, " returns ", returns.size(), " values, ", step.out_slots.size(),
                " output slots given");
    for (int64_t slot : step.out_slots) {
      if (slot != -1) check_slot(slot);
    }
    for (int64_t slot : step.released) check_slot(slot);
    steps_.push_back(std::move(step));
  }

  at::Tensor run(const at::Tensor& x) const {
    std::vector<c10::IValue> slots(n_slots_);
    slots[0] = x;
    torch::jit::Stack stack;
    for (const Step& step : steps_) {
      stack = step.arguments;
      for (const auto& [position, slot] : step.slot_args) stack[position] = slots[slot];
      for (const ListArg& list : step.list_args) {
        c10::List<at::Tensor> tensors;
        tensors.reserve(list.slots.size());
        for (size_t j = 0; j < list.slots.size(); ++j) {
          tensors.push_back(list.slots[j] >= 0 ? slots[list.slots[j]].toTensor() : list.constants[j]);
        }
        stack[list.position] = std::move(tensors);
      }
      step.op.callBoxed(stack);
      if (step.list_output) {
        const auto outputs = stack.at(0).toTensorList();
        TORCH_CHECK(outputs.size() == step.out_slots.size(), "ReplayPlan: ", step.op.schema().name(),
                    " returned ", outputs.size(), " tensors, recorded ", step.out_slots.size());
        for (size_t j = 0; j < outputs.size(); ++j) {
          if (step.out_slots[j] >= 0) slots[step.out_slots[j]] = outputs.get(j);
        }
      } else {
        for (size_t j = 0; j < step.out_slots.size(); ++j) {
          if (step.out_slots[j] >= 0) slots[step.out_slots[j]] = std::move(stack.at(j));
        }
      }
      for (int64_t slot : step.released) slots[slot] = c10::IValue();
    }
    return slots[out_slot_].toTensor();
  }

  size_t size() const { return steps_.size(); }

 private:
  int64_t check_slot(int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < n_slots_, "ReplayPlan: slot ", slot, " out of range [0, ", n_slots_, ")");
    return slot;
  }

  int64_t n_slots_, out_slot_;
  std::vector<Step> steps_;
};

}  // namespace

void add_plan_replay(PyObject* module) {
  py::module_ m = py::reinterpret_borrow<py::module_>(module);
  py::class_<ReplayPlan>(m, "ReplayPlan")
      .def(py::init<int64_t, int64_t>(), py::arg("n_slots"), py::arg("out_slot"))
      .def("add_step", &ReplayPlan::add_step)
      .def("run", &ReplayPlan::run, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &ReplayPlan::size);
}

}  // namespace cnnkernels
