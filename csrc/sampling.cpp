#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

namespace qwen2rt {

int Sampler::sample(const float* logits, int vocab, const SamplingParams& p, const int32_t* history, int n_history,
                    double u) {
    if (vocab < 1) throw InvalidArgument("empty logits");
    if (!(p.temperature >= 0.f) || !(p.top_p > 0.f && p.top_p <= 1.f) || !(p.min_p >= 0.f && p.min_p <= 1.f) ||
        !(p.repetition_penalty > 0.f) || p.top_k < 0)
        throw InvalidArgument("sampling parameters out of range");
    work_.assign(logits, logits + vocab);
    float* w = work_.data();

    // Repetition penalty (CTRL paper, as transformers): each token seen once, whatever its count.
    if (p.repetition_penalty != 1.f && n_history > 0) {
        seen_.assign(size_t(vocab), 0);
        for (int i = 0; i < n_history; i++) {
            const int32_t t = history[i];
            if (t < 0 || t >= vocab || seen_[t]) continue;
            seen_[t] = 1;
            w[t] = w[t] > 0.f ? w[t] / p.repetition_penalty : w[t] * p.repetition_penalty;
        }
    }

    if (p.temperature == 0.f) {  // greedy; ties go to the lowest id, as torch.argmax
        int best = 0;
        for (int i = 1; i < vocab; i++)
            if (w[i] > w[best]) best = i;
        return best;
    }

    // Candidates in decreasing logit order. Only the top `keep` need sorting: top_k bounds it, and
    // for top-p the first 256 usually hold the whole nucleus; if not, sort them all.
    idx_.resize(size_t(vocab));
    for (int i = 0; i < vocab; i++) idx_[i] = i;
    auto by_logit = [w](int32_t a, int32_t b) { return w[a] > w[b] || (w[a] == w[b] && a < b); };
    int n = vocab;
    if (p.top_k > 0 && p.top_k < n) {
        std::nth_element(idx_.begin(), idx_.begin() + p.top_k, idx_.end(), by_logit);
        n = p.top_k;
    }
    int sorted = std::min(n, 256);
    std::partial_sort(idx_.begin(), idx_.begin() + sorted, idx_.begin() + n, by_logit);

    // Softmax of logit / temperature over the n candidates (probabilities of the sorted head first).
    const float mx = w[idx_[0]];
    const double inv_t = 1.0 / double(p.temperature);
    prob_.resize(size_t(n));
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        prob_[i] = float(std::exp((double(w[idx_[i]]) - mx) * inv_t));
        total += prob_[i];
    }

    // top-p: the smallest head whose mass reaches top_p (at least one token).
    int keep = n;
    if (p.top_p < 1.f) {
        for (;;) {
            double cum = 0.0;
            int i = 0;
            for (; i < sorted; i++) {
                cum += prob_[i] / total;
                if (cum >= p.top_p) break;
            }
            if (i < sorted) {
                keep = i + 1;
                break;
            }
            if (sorted == n) break;
            // the nucleus reaches past the sorted head: sort everything and recompute probabilities
            std::sort(idx_.begin(), idx_.begin() + n, by_logit);
            sorted = n;
            for (int j = 0; j < n; j++) prob_[j] = float(std::exp((double(w[idx_[j]]) - mx) * inv_t));
        }
    }
    // min-p: drop tokens below min_p times the top probability (prob_[0] is the top: exp(0) = 1).
    if (p.min_p > 0.f) {
        int i = 1;
        while (i < keep && i < sorted && prob_[i] >= p.min_p * prob_[0]) i++;
        if (i < sorted || sorted == n) keep = std::min(keep, i);
        else {  // the cut lies in the unsorted tail: sort it first
            std::sort(idx_.begin(), idx_.begin() + n, by_logit);
            for (int j = 0; j < n; j++) prob_[j] = float(std::exp((double(w[idx_[j]]) - mx) * inv_t));
            i = 1;
            while (i < keep && prob_[i] >= p.min_p * prob_[0]) i++;
            keep = i;
        }
    }

    double mass = 0.0;
    for (int i = 0; i < keep; i++) mass += prob_[i];
    double target = u * mass, cum = 0.0;
    for (int i = 0; i < keep; i++) {
        cum += prob_[i];
        if (target < cum) return idx_[i];
    }
    return idx_[keep - 1];
}

}  // namespace qwen2rt
