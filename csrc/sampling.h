// Picking the next token from a row of logits: repetition penalty, temperature, top-k, top-p, min-p,
// in the order transformers applies them.
#pragma once

#include <cstdint>
#include <vector>

namespace qwen2rt {

struct SamplingParams {
    float temperature = 0.f;         // 0: greedy (argmax)
    int top_k = 0;                   // 0: off
    float top_p = 1.f;               // 1: off
    float min_p = 0.f;               // 0: off
    float repetition_penalty = 1.f;  // 1: off; applied to every token in `history`
};

class Sampler {
  public:
    // `u` is a uniform random number in [0, 1) supplied by the caller (who owns the seeded RNG).
    // `history` holds the token ids seen so far (prompt and generated) for the repetition penalty.
    int sample(const float* logits, int vocab, const SamplingParams& p, const int32_t* history, int n_history,
               double u);

  private:
    std::vector<float> work_;
    std::vector<int32_t> idx_;
    std::vector<float> prob_;
    std::vector<uint8_t> seen_;
};

}  // namespace qwen2rt
