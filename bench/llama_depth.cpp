// Time a llama.cpp-API engine the way bench/native_compare.py times bitdlm: a batch of
// B tokens (pp) and single-token steps (tg) after DEPTH cached positions, with its
// own libllama (bitnet.cpp's fork, whose llama-bench has no depth option). Or, with
// --tokens, print the logits of every position of a token list (correctness checks).
//
//   llama-depth MODEL [--threads T] [--depth D] [--batch B] [--gen G] [--reps R]
//   llama-depth MODEL --tokens 1,2,3 [--threads T]
//
// Prints one JSON line. Built by bench/build_bitnet_bench.sh (links libllama + ggml).
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void fill(llama_batch & b, const std::vector<llama_token> & toks, int pos0, bool all_logits) {
  b.n_tokens = (int32_t)toks.size();
  for (size_t i = 0; i < toks.size(); i++) {
    b.token[i] = toks[i];
    b.pos[i] = pos0 + (llama_pos)i;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = 0;
    b.logits[i] = all_logits || i + 1 == toks.size();
  }
}

static double decode_ms(llama_context * ctx, llama_batch & b) {
  auto t0 = std::chrono::steady_clock::now();
  if (llama_decode(ctx, b) != 0) {
    fprintf(stderr, "llama_decode failed\n");
    exit(1);
  }
  llama_synchronize(ctx);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

static void print_list(const char * key, const std::vector<double> & xs, bool last) {
  printf("\"%s\": [", key);
  for (size_t i = 0; i < xs.size(); i++) printf("%s%.4f", i ? ", " : "", xs[i]);
  printf("]%s", last ? "" : ", ");
}

int main(int argc, char ** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL [--threads T] [--depth D] [--batch B] [--gen G] [--reps R] [--tokens a,b,c]\n",
            argv[0]);
    return 2;
  }
  int threads = 1, depth = 512, batch = 32, gen = 16, reps = 5;
  std::vector<llama_token> tokens;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    const char * v = argv[i + 1];
    if (k == "--threads") threads = atoi(v);
    else if (k == "--depth") depth = atoi(v);
    else if (k == "--batch") batch = atoi(v);
    else if (k == "--gen") gen = atoi(v);
    else if (k == "--reps") reps = atoi(v);
    else if (k == "--tokens") {
      for (const char * p = v; *p;) {
        tokens.push_back((llama_token)strtol(p, (char **)&p, 10));
        if (*p == ',') p++;
      }
    } else {
      fprintf(stderr, "unknown option %s\n", k.c_str());
      return 2;
    }
  }
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  llama_model * model = llama_load_model_from_file(argv[1], mp);
  if (!model) {
    fprintf(stderr, "cannot load %s\n", argv[1]);
    return 1;
  }
  const int n_vocab = llama_n_vocab(model);
  const int n_max = tokens.empty() ? depth + (batch > gen ? batch : gen) : (int)tokens.size();
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = (uint32_t)n_max;
  cp.n_batch = cp.n_ubatch = 512;
  cp.n_threads = cp.n_threads_batch = threads;
  llama_context * ctx = llama_new_context_with_model(model, cp);
  if (!ctx) {
    fprintf(stderr, "cannot create a context\n");
    return 1;
  }
  llama_batch b = llama_batch_init(512, 0, 1);

  if (!tokens.empty()) {  // logits of every position
    printf("{\"n_vocab\": %d, \"logits\": [", n_vocab);
    for (size_t s = 0; s < tokens.size(); s += 512) {
      std::vector<llama_token> part(tokens.begin() + s, tokens.begin() + std::min(tokens.size(), s + 512));
      fill(b, part, (int)s, true);
      decode_ms(ctx, b);
      for (size_t i = 0; i < part.size(); i++) {
        const float * l = llama_get_logits_ith(ctx, (int32_t)i);
        printf("%s[", s + i ? ", " : "");
        for (int v = 0; v < n_vocab; v++) printf("%s%.6g", v ? ", " : "", l[v]);
        printf("]");
      }
    }
    printf("]}\n");
  } else {
    unsigned rng = 12345u;  // random token ids below the last 8 (bitdlm's special ids)
    auto draw = [&](int n) {
      std::vector<llama_token> t(n);
      for (auto & x : t) x = (llama_token)((rng = rng * 1664525u + 1013904223u) >> 8) % (n_vocab - 8);
      return t;
    };
    for (int s = 0; s < depth; s += 512) {
      fill(b, draw(std::min(512, depth - s)), s, false);
      decode_ms(ctx, b);
    }
    std::vector<double> pp, tg;
    bool finite = true;
    for (int r = 0; r <= reps; r++) {  // the first repetition warms up
      fill(b, draw(batch), depth, false);
      double ms = decode_ms(ctx, b);
      const float * l = llama_get_logits_ith(ctx, batch - 1);
      for (int v = 0; v < n_vocab; v++) finite = finite && std::isfinite(l[v]);
      llama_kv_cache_seq_rm(ctx, 0, depth, -1);
      double gms = 0;
      for (int g = 0; g < gen; g++) {
        fill(b, draw(1), depth + g, false);
        gms += decode_ms(ctx, b);
      }
      llama_kv_cache_seq_rm(ctx, 0, depth, -1);
      if (r) {
        pp.push_back(ms);
        tg.push_back(gms / gen);
      }
    }
    printf("{\"threads\": %d, \"depth\": %d, \"batch\": %d, \"gen\": %d, \"n_vocab\": %d, \"finite\": %s, ", threads,
           depth, batch, gen, n_vocab, finite ? "true" : "false");
    print_list("pp_ms", pp, false);
    print_list("tg_ms", tg, true);
    printf("}\n");
  }
  llama_batch_free(b);
  llama_free(ctx);
  llama_free_model(model);
  llama_backend_free();
  return 0;
}
