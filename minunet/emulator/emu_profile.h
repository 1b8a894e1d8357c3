// emu_profile.h -- count what a GPU profiler counts, from the accesses the checked build sees.
//
// Two kinds of counts (launcher.py turns them into a report, profiler.py into a table):
//
//  - Over every block: the distinct 32-byte sectors of each argument buffer that the launch read
//    and wrote. That is the least the launch must move between DRAM and the chip (each sector once;
//    a lower bound that assumes the L2 cache keeps every sector it needs again).
//  - Over a sample of blocks (every n-th block index): each CUDA thread's accesses are recorded in
//    order with the instruction that made them (its code address). At the end of the block the
//    accesses of the 32 lanes of each warp are grouped into warp-level *requests*: the k-th time
//    lane l executes instruction pc pairs with the k-th time every other lane of the warp executes
//    it, which is what one warp instruction is when the lanes run in step. Per request:
//      global memory: the number of distinct 32-byte sectors its lanes touch (4 for 32 consecutive
//        floats, 32 when each lane's float lies in another sector);
//      shared memory: the wavefronts, i.e. passes through the 32 banks of 4 bytes: the largest
//        number of *distinct* 4-byte words any one bank is asked for (lanes reading the same word
//        share it: a broadcast). 8- and 16-byte accesses are split into 2 and 4 phases of 16 and 8
//        lanes (256 and 512 bytes cannot pass 128-byte-wide banks at once), each counted alike.
//  - Tensor-core FLOPs: 2*m*n*k per wmma::mma_sync of a warp, over every block.
//  - The busiest thread (for the critical path of gpu_model.predict_launch): over every block,
//    each thread's global loads, global stores, shared loads and shared stores; the thread with the
//    most accesses in all gives its four counts. On the sampled blocks, each warp's global load
//    requests are replayed in program order against the sectors the block has already touched: a
//    request whose sectors were all touched before by the block is an L1 hit (the data is on the
//    multiprocessor), otherwise an L1 miss (it waits for L2 or DRAM); the sampled thread with the
//    most loads gives its hits and misses.
//  - L1 lines: the distinct 128-byte lines each global request touches (the L1's tag stage looks
//    up one line per cycle: a coalesced request is 1, a scattered one up to 32), sampled.
#pragma once

#include <algorithm>
#include <map>
#include <set>
#include <vector>

namespace emu {

struct Profile {             // mirrored by launcher.py
    uint64_t sampled_blocks, total_blocks;
    uint64_t global_load_requests, global_load_sectors, global_load_bytes;
    uint64_t global_store_requests, global_store_sectors, global_store_bytes;
    uint64_t shared_load_requests, shared_load_wavefronts, shared_load_bytes;
    uint64_t shared_store_requests, shared_store_wavefronts, shared_store_bytes;
    uint64_t dram_read_sectors, dram_write_sectors;
    uint64_t tensor_flops;
    uint64_t thread_global_loads, thread_global_stores, thread_shared_loads, thread_shared_stores;
    uint64_t busy_l1_hits, busy_l1_misses;
    uint64_t global_lines;
};

struct ThreadCounts { uint32_t global_loads, global_stores, shared_loads, shared_stores; };

struct Access { uint64_t address; uint32_t pc; uint16_t size; uint8_t is_write, space; };

static Profile* g_profile;
static std::vector<Access>* g_traces;      // one per thread of the block, while sampling
static size_t g_trace_capacity;
static bool g_sampling;
static uint64_t** g_sector_bits;           // per zone: [read bits, write bits]
static ThreadCounts* g_thread_counts;      // per thread of the running block, every block
static std::set<uint64_t>* g_block_sectors; // sectors the sampled block has touched (its L1)
static std::vector<uint32_t> g_lane_hits, g_lane_misses;

EMU_NOSAN static void mark_sectors(int zone, uintptr_t a, size_t n, int is_write) {
    uint64_t* bits = g_sector_bits[zone] + (is_write ? ((g_spans[zone].hi - g_spans[zone].lo + 2047) / 2048) : 0);
    for (uint64_t s = (a - g_spans[zone].lo) >> 5; s <= (a + n - 1 - g_spans[zone].lo) >> 5; ++s)
        bits[s >> 6] |= 1ull << (s & 63);
}

EMU_NOSAN static void profile_access(int space, uintptr_t a, size_t n, int is_write, const void* pc) {
    ThreadCounts& t = g_thread_counts[g_tid];
    if (space == SPACE_GLOBAL) {
        int z = zone_of(a);
        if (z >= 0 && g_sector_bits[z]) mark_sectors(z, a, n, is_write);
        if (is_write) t.global_stores++; else t.global_loads++;
    } else {
        if (is_write) t.shared_stores++; else t.shared_loads++;
    }
    if (g_sampling)
        g_traces[g_tid].push_back(Access{a, (uint32_t)code_offset(pc), (uint16_t)n, (uint8_t)is_write, (uint8_t)space});
}

EMU_NOSAN static uint64_t count_bits(const uint64_t* bits, size_t words) {
    uint64_t total = 0;
    for (size_t i = 0; i < words; ++i) total += (uint64_t)__builtin_popcountll(bits[i]);
    return total;
}

// ---- Per launch attempt -------------------------------------------------------------------------
EMU_NOSAN static void profile_free() {
    if (g_sector_bits) {
        for (int z = 0; z < g_nspans; ++z) free(g_sector_bits[z]);
        free(g_sector_bits);
    }
    g_sector_bits = nullptr;
    delete[] g_traces;
    g_traces = nullptr;
    free(g_thread_counts);
    g_thread_counts = nullptr;
    delete g_block_sectors;
    g_block_sectors = nullptr;
    g_trace_capacity = 0;
    g_profile_hook.access = nullptr;
    g_sampling = false;
}

EMU_NOSAN static void profile_attempt_start(Profile* out) {
    profile_free();
    g_profile = out;
    if (!out || !g_options.profile) return;
    memset(out, 0, sizeof *out);
    out->total_blocks = g_nblocks;
    g_sector_bits = (uint64_t**)calloc((size_t)g_nspans, sizeof(uint64_t*));
    for (int z = 0; z < g_nspans; ++z) {
        if (z == g_dynamic_zone) continue;
        size_t words = (g_spans[z].hi - g_spans[z].lo + 2047) / 2048;  // 64 sectors of 32 bytes per word
        g_sector_bits[z] = (uint64_t*)calloc(2 * words + 1, sizeof(uint64_t));
    }
    g_traces = new std::vector<Access>[g_nthreads];
    g_trace_capacity = g_nthreads;
    g_thread_counts = (ThreadCounts*)calloc(g_nthreads, sizeof(ThreadCounts));
    g_block_sectors = new std::set<uint64_t>;
    g_lane_hits.assign(g_nthreads, 0);
    g_lane_misses.assign(g_nthreads, 0);
    g_profile_hook.access = profile_access;
}

EMU_NOSAN static void profile_block_start(uint64_t block) {
    g_sampling = g_profile && g_options.profile && block % (g_options.sample_every ? g_options.sample_every : 1) == 0;
    if (g_sampling) g_profile->sampled_blocks++;
    if (g_thread_counts) memset(g_thread_counts, 0, g_nthreads * sizeof(ThreadCounts));
}

struct Request { int space, is_write; size_t first; std::vector<std::pair<int, const Access*>> lanes; };

// Shared memory: the wavefronts one request needs (see the file's comment).
EMU_NOSAN static uint64_t wavefronts(const Request& r) {
    int size = 0;
    for (auto& la : r.lanes) size = la.second->size > size ? la.second->size : size;
    const int phases = size <= 4 ? 1 : size <= 8 ? 2 : 4, per_phase = 32 / phases;
    uint64_t total = 0;
    for (int p = 0; p < phases; ++p) {
        std::set<uint64_t> words[32];
        bool any = false;
        for (auto& la : r.lanes) {
            if (la.first / per_phase != p) continue;
            any = true;
            for (uint64_t w = la.second->address >> 2; w <= (la.second->address + la.second->size - 1) >> 2; ++w)
                words[w & 31].insert(w);
        }
        size_t most = 0;
        for (auto& bank : words) most = bank.size() > most ? bank.size() : most;
        if (any) total += most ? most : 1;
    }
    return total;
}

EMU_NOSAN static uint64_t lines(const Request& r) {
    std::set<uint64_t> touched;
    for (auto& la : r.lanes)
        for (uint64_t l = la.second->address >> 7; l <= (la.second->address + la.second->size - 1) >> 7; ++l)
            touched.insert(l);
    return touched.size();
}

EMU_NOSAN static uint64_t sectors(const Request& r) {
    std::set<uint64_t> touched;
    for (auto& la : r.lanes)
        for (uint64_t s = la.second->address >> 5; s <= (la.second->address + la.second->size - 1) >> 5; ++s) touched.insert(s);
    return touched.size();
}

EMU_NOSAN static void analyze_warp(uint32_t base, uint32_t count) {
    std::map<std::pair<uint64_t, uint32_t>, Request> requests;  // (instruction, occurrence) -> request
    for (uint32_t l = 0; l < count; ++l) {
        std::map<uint64_t, uint32_t> seen;  // instruction -> times this lane executed it
        for (const Access& a : g_traces[base + l]) {
            const uint64_t instruction = ((uint64_t)a.pc << 3) | ((uint64_t)a.space << 1) | a.is_write;
            auto key = std::make_pair(instruction, seen[instruction]++);
            auto found = requests.find(key);
            Request& r = requests[key];
            if (found == requests.end()) r.first = (size_t)(&a - g_traces[base + l].data());
            r.space = a.space;
            r.is_write = a.is_write;
            r.lanes.push_back({(int)l, &a});
        }
    }
    Profile& p = *g_profile;
    // L1: replay this warp's global loads in program order (the order of their first lane's trace)
    std::vector<const Request*> loads;
    for (auto& entry : requests)
        if (entry.second.space == SPACE_GLOBAL && !entry.second.is_write) loads.push_back(&entry.second);
    std::stable_sort(loads.begin(), loads.end(),
                     [](const Request* a, const Request* b) { return a->first < b->first; });
    for (const Request* r : loads) {
        bool hit = true;
        for (auto& la : r->lanes)
            for (uint64_t s = la.second->address >> 5; s <= (la.second->address + la.second->size - 1) >> 5; ++s)
                if (g_block_sectors->insert(s).second) hit = false;
        for (auto& la : r->lanes) (hit ? g_lane_hits : g_lane_misses)[base + la.first]++;
    }
    for (auto& entry : requests) {
        const Request& r = entry.second;
        uint64_t bytes = 0;
        for (auto& la : r.lanes) bytes += la.second->size;
        if (r.space == SPACE_GLOBAL) {
            p.global_lines += lines(r);
            if (r.is_write) { p.global_store_requests++; p.global_store_sectors += sectors(r); p.global_store_bytes += bytes; }
            else { p.global_load_requests++; p.global_load_sectors += sectors(r); p.global_load_bytes += bytes; }
        } else {
            if (r.is_write) { p.shared_store_requests++; p.shared_store_wavefronts += wavefronts(r); p.shared_store_bytes += bytes; }
            else { p.shared_load_requests++; p.shared_load_wavefronts += wavefronts(r); p.shared_load_bytes += bytes; }
        }
    }
}

EMU_NOSAN static void profile_block_end() {
    if (!g_profile || !g_options.profile || !g_thread_counts) return;
    Profile& p = *g_profile;
    for (uint32_t t = 0; t < g_nthreads; ++t) {   // the busiest thread so far, by all its accesses
        const ThreadCounts& c = g_thread_counts[t];
        if ((uint64_t)c.global_loads + c.global_stores + c.shared_loads + c.shared_stores >
            p.thread_global_loads + p.thread_global_stores + p.thread_shared_loads + p.thread_shared_stores) {
            p.thread_global_loads = c.global_loads; p.thread_global_stores = c.global_stores;
            p.thread_shared_loads = c.shared_loads; p.thread_shared_stores = c.shared_stores;
        }
    }
    if (!g_sampling) return;
    g_block_sectors->clear();
    for (uint32_t t = 0; t < g_nthreads; ++t) g_lane_hits[t] = g_lane_misses[t] = 0;
    for (uint32_t base = 0; base < g_nthreads; base += 32)
        analyze_warp(base, g_nthreads - base < 32 ? g_nthreads - base : 32);
    for (uint32_t t = 0; t < g_nthreads; ++t)   // the sampled thread with the most global loads
        if ((uint64_t)g_lane_hits[t] + g_lane_misses[t] > p.busy_l1_hits + p.busy_l1_misses) {
            p.busy_l1_hits = g_lane_hits[t]; p.busy_l1_misses = g_lane_misses[t];
        }
    for (uint32_t t = 0; t < g_nthreads; ++t) { g_traces[t].clear(); g_traces[t].shrink_to_fit(); }
    g_sampling = false;
}

EMU_NOSAN static void profile_launch_end() {
    if (!g_profile || !g_options.profile || !g_sector_bits) return;
    for (int z = 0; z < g_nspans; ++z) {
        if (!g_sector_bits[z]) continue;
        size_t words = (g_spans[z].hi - g_spans[z].lo + 2047) / 2048;
        g_profile->dram_read_sectors += count_bits(g_sector_bits[z], words);
        g_profile->dram_write_sectors += count_bits(g_sector_bits[z] + words, words);
    }
    g_profile->tensor_flops = g_tensor_flops;
}

}  // namespace emu
