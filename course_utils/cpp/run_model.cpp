// run_model: load an exported PyTorch model in C++ (no Python) and run it on one batch.
//
//   run_model torchscript MODEL.pt  INPUT.bin N C H W OUTPUT.bin
//   run_model aoti        MODEL.pt2 INPUT.bin N C H W OUTPUT.bin
//
// INPUT.bin holds N*C*H*W float32 values in C order (numpy's `x.tofile(path)`); the model's
// first output is written to OUTPUT.bin the same way, and one line per row is printed:
// "row <i>: class <argmax>". Build it against the libtorch inside the installed torch wheel:
// course_utils.export.build_cpp_loader() prints and runs the one g++ command (C++20: ATen needs it).
#include <torch/script.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

static std::vector<float> read_floats(const std::string& path, size_t count) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open input file " + path);
  std::vector<float> values(count);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (static_cast<size_t>(in.gcount()) != count * sizeof(float))
    throw std::runtime_error("input file " + path + " is shorter than N*C*H*W float32 values");
  return values;
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: " << argv[0] << " {torchscript|aoti} MODEL INPUT.bin N C H W OUTPUT.bin\n";
    return 2;
  }
  const std::string kind = argv[1], model_path = argv[2], input_path = argv[3], output_path = argv[8];
  const std::vector<int64_t> shape = {std::atoll(argv[4]), std::atoll(argv[5]), std::atoll(argv[6]), std::atoll(argv[7])};
  try {
    size_t count = 1;
    for (int64_t d : shape) count *= static_cast<size_t>(d);
    std::vector<float> values = read_floats(input_path, count);
    at::Tensor input = torch::from_blob(values.data(), shape, torch::kFloat32).clone();

    c10::InferenceMode guard;  // the C++ twin of torch.inference_mode()
    at::Tensor output;
    if (kind == "torchscript") {
      torch::jit::Module module = torch::jit::load(model_path);
      module.eval();
      output = module.forward({input}).toTensor();
    } else if (kind == "aoti") {
      torch::inductor::AOTIModelPackageLoader loader(model_path);
      output = loader.run({input})[0];
    } else {
      std::cerr << "unknown model kind '" << kind << "': use torchscript or aoti\n";
      return 2;
    }
    output = output.contiguous().to(torch::kFloat32);
    std::ofstream out(output_path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(output.data_ptr<float>()),
              static_cast<std::streamsize>(output.numel() * sizeof(float)));
    at::Tensor classes = output.argmax(1);
    for (int64_t i = 0; i < classes.size(0); ++i)
      std::cout << "row " << i << ": class " << classes[i].item<int64_t>() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
