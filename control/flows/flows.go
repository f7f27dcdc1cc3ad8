// SPDX-License-Identifier: Apache-2.0

// Package flows answers queries over the datapath's flow map: which client
// uses which line, with packets and bytes each way. It streams the map in
// batches, so a listing of a million flows needs no more memory than one
// batch, and a sorted top-N keeps only N flows.
package flows

import (
	"cmp"
	"container/heap"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

// Row is one flow as `uplinkd flows --json` prints it, one object a line.
type Row struct {
	Client     string  `json:"client"`
	ClientPort uint16  `json:"client_port"` // the echo identifier for ICMP
	Remote     string  `json:"remote"`
	RemotePort uint16  `json:"remote_port"`
	Proto      string  `json:"proto"` // tcp, udp, icmp, icmpv6, or the number
	Line       string  `json:"line"`  // the line's name; its number where unknown
	LineNumber int     `json:"line_number"`
	NATSource  string  `json:"nat_source,omitempty"`
	Recovered  bool    `json:"recovered"`      // its line came from conntrack, not the buckets
	Policy     string  `json:"policy"`         // the policy that gave it its line: "balanced" unless a rule matched
	Rule       string  `json:"rule,omitempty"` // the rule that matched its first packet; "" for none
	TxPackets  uint64  `json:"tx_packets"`     // LAN to Internet
	TxBytes    uint64  `json:"tx_bytes"`
	RxPackets  uint64  `json:"rx_packets"` // Internet to LAN
	RxBytes    uint64  `json:"rx_bytes"`
	AgeSeconds float64 `json:"age_seconds"`
	IdleSecs   float64 `json:"idle_seconds"`
}

// Query selects, orders and bounds flows. Zero values select everything
// in map order.
type Query struct {
	Line   string       // a line's name or number
	Client netip.Prefix // the client's address within it
	Proto  uint8        // 0: any
	Port   uint16       // either side's port; 0: any
	Sort   string       // "", "bytes" (most first), "age" (oldest first), "idle" (most idle first)
	Limit  int          // 0: no limit
}

// Sorts are the orders Query.Sort takes.
var Sorts = []string{"bytes", "age", "idle"}

// Protos names the protocols a query may name.
var Protos = map[string]uint8{"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}

// ParseProto reads a protocol name or number.
func ParseProto(s string) (uint8, error) {
	if p, ok := Protos[strings.ToLower(s)]; ok {
		return p, nil
	}
	var n int
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 1 || n > 255 || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("want tcp, udp, icmp, icmpv6 or 1..255, got %q", s)
	}
	return uint8(n), nil
}

// ParseClient reads an address or a prefix.
func ParseClient(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("want an address or a prefix, got %q", s)
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

// Names give the numbers the flow map records their names.
type Names struct {
	Lines    map[int]string // by line number (1-based)
	Rules    []string       // by rule index
	Policies []string       // by policy id
}

// Source is where flows come from: loader.Stats.
type Source interface {
	Flows(fn func(loader.Flow) bool) error
}

// Run streams the flows q selects to emit, in q's order, with names's
// names for the lines, rules and policies. Without Sort, flows are emitted as the
// map is read and Limit stops the read early; with Sort and Limit, only
// Limit flows are kept; with Sort alone, every selected flow is.
func Run(src Source, q Query, names Names, now time.Time, emit func(Row) error) error {
	lineNumber := -1
	if q.Line != "" {
		lineNumber = LineNumber(q.Line, names.Lines)
		if lineNumber < 0 {
			return fmt.Errorf("no line %q", q.Line)
		}
	}
	if q.Sort != "" && !slices.Contains(Sorts, q.Sort) {
		return fmt.Errorf("sort by %s, %s or %s, not %q", Sorts[0], Sorts[1], Sorts[2], q.Sort)
	}
	match := func(f *loader.Flow) bool {
		return (lineNumber < 0 || f.Line+1 == lineNumber) &&
			(!q.Client.IsValid() || q.Client.Contains(f.Src.Addr())) &&
			(q.Proto == 0 || f.Proto == q.Proto) &&
			(q.Port == 0 || f.Src.Port() == q.Port || f.Dst.Port() == q.Port)
	}
	var emitErr error
	if q.Sort == "" {
		n := 0
		err := src.Flows(func(f loader.Flow) bool {
			if !match(&f) {
				return true
			}
			if emitErr = emit(rowOf(&f, names, now)); emitErr != nil {
				return false
			}
			n++
			return q.Limit == 0 || n < q.Limit
		})
		return cmp.Or(emitErr, err)
	}
	key := sortKey(q.Sort, now)
	h := &topN{key: key, limit: q.Limit}
	if err := src.Flows(func(f loader.Flow) bool {
		if match(&f) {
			h.add(f)
		}
		return true
	}); err != nil {
		return err
	}
	// Highest key first.
	slices.SortFunc(h.flows, func(a, b loader.Flow) int { return cmp.Compare(key(&b), key(&a)) })
	for i := range h.flows {
		if err := emit(rowOf(&h.flows[i], names, now)); err != nil {
			return err
		}
	}
	return nil
}

// sortKey is the value a sort orders by, highest first.
func sortKey(by string, now time.Time) func(*loader.Flow) float64 {
	switch by {
	case "age":
		return func(f *loader.Flow) float64 { return float64(now.Sub(f.FirstSeen)) }
	case "idle":
		return func(f *loader.Flow) float64 { return float64(now.Sub(f.LastSeen)) }
	}
	return func(f *loader.Flow) float64 { return float64(f.TxBytes + f.RxBytes) }
}

// topN keeps the limit flows of highest key (all when limit is 0): a
// min-heap, so that the smallest kept is the one replaced.
type topN struct {
	key   func(*loader.Flow) float64
	limit int
	flows []loader.Flow
}

func (h *topN) Len() int           { return len(h.flows) }
func (h *topN) Less(i, j int) bool { return h.key(&h.flows[i]) < h.key(&h.flows[j]) }
func (h *topN) Swap(i, j int)      { h.flows[i], h.flows[j] = h.flows[j], h.flows[i] }
func (h *topN) Push(x any)         { h.flows = append(h.flows, x.(loader.Flow)) }
func (h *topN) Pop() any {
	f := h.flows[len(h.flows)-1]
	h.flows = h.flows[:len(h.flows)-1]
	return f
}

func (h *topN) add(f loader.Flow) {
	switch {
	case h.limit == 0 || len(h.flows) < h.limit:
		heap.Push(h, f)
	case h.key(&f) > h.key(&h.flows[0]):
		h.flows[0] = f
		heap.Fix(h, 0)
	}
}

// LineNumber is the number of the line named s (a name in names, or a
// number), or -1.
func LineNumber(s string, names map[int]string) int {
	for n, name := range names {
		if name == s {
			return n
		}
	}
	var n int
	if _, err := fmt.Sscanf(s, "%d", &n); err == nil && fmt.Sprint(n) == s && n >= 1 && n <= loader.MaxLines {
		return n
	}
	return -1
}

// ProtoName names an IP protocol number.
func ProtoName(p uint8) string {
	for name, n := range Protos {
		if n == p {
			return name
		}
	}
	return fmt.Sprint(p)
}

func rowOf(f *loader.Flow, names Names, now time.Time) Row {
	r := Row{
		Client: f.Src.Addr().String(), ClientPort: f.Src.Port(),
		Remote: f.Dst.Addr().String(), RemotePort: f.Dst.Port(),
		Proto: ProtoName(f.Proto), LineNumber: f.Line + 1, Recovered: f.Recovered,
		TxPackets: f.TxPackets, TxBytes: f.TxBytes, RxPackets: f.RxPackets, RxBytes: f.RxBytes,
		AgeSeconds: max(0, now.Sub(f.FirstSeen).Seconds()), IdleSecs: max(0, now.Sub(f.LastSeen).Seconds()),
	}
	r.Line = names.Lines[r.LineNumber]
	if r.Line == "" {
		r.Line = fmt.Sprint(r.LineNumber)
	}
	r.Policy = nameOf(names.Policies, f.Policy)
	if f.Policy == 0 && r.Policy == "0" {
		r.Policy = "balanced"
	}
	if f.Rule >= 0 {
		r.Rule = nameOf(names.Rules, f.Rule)
	}
	if f.NATAddr.IsValid() {
		r.NATSource = f.NATAddr.String()
	}
	return r
}

// Counts are the flows in the flow map, by line number, by policy id and
// in all.
type Counts struct {
	PerLine, PerPolicy map[int]int
	Total              int
}

// Count counts the flows pinned to each line and each policy, and in all.
func Count(src Source) (Counts, error) {
	c := Counts{PerLine: map[int]int{}, PerPolicy: map[int]int{}}
	err := src.Flows(func(f loader.Flow) bool {
		c.PerLine[f.Line+1]++
		c.PerPolicy[f.Policy]++
		c.Total++
		return true
	})
	return c, err
}

// nameOf is names[i], or i where names has no name for it.
func nameOf(names []string, i int) string {
	if i >= 0 && i < len(names) && names[i] != "" {
		return names[i]
	}
	return fmt.Sprint(i)
}
