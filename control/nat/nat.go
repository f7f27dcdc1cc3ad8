// SPDX-License-Identifier: Apache-2.0

// Package nat keeps uplinkd's own nftables table (family inet) equal to
// plan.NAT: source NAT per line and the seed's stateful forwarding
// basics. The table is uplinkd's alone; it is compared through the
// comments of its rules and, when it differs, replaced in one atomic
// transaction. No other table is read or touched.
package nat

import (
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/plan"
)

// chainSpec is how each of uplinkd's chains is declared.
type chainSpec struct {
	name     string
	typ      nftables.ChainType
	hook     *nftables.ChainHook
	priority *nftables.ChainPriority
}

var chains = []chainSpec{
	{plan.ChainPrerouting, nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityMangle},
	{plan.ChainPostrouting, nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource},
	{plan.ChainForward, nftables.ChainTypeFilter, nftables.ChainHookForward, nftables.ChainPriorityFilter},
	{plan.ChainLANSrc, "", nil, nil},
	{plan.ChainOwner, "", nil, nil},
}

// ErrNotOurs says a table of uplinkd's name exists that uplinkd did not
// create: it is neither replaced nor deleted.
var ErrNotOurs = errors.New("not created by uplinkd")

// fingerprint describes a table by its chains and its rules' comments, in
// the same form for the desired table and for the kernel's.
func fingerprint(chainDecl map[string]string, comments map[string][]string) string {
	var b strings.Builder
	names := make([]string, 0, len(chainDecl))
	for n := range chainDecl {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Fprintf(&b, "chain %s %s\n", n, chainDecl[n])
		for _, c := range comments[n] {
			fmt.Fprintf(&b, "\t%s\n", c)
		}
	}
	return b.String()
}

func decl(typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority) string {
	h, p := -1, 0
	if hook != nil {
		h = int(*hook)
	}
	if prio != nil {
		p = int(*prio)
	}
	return fmt.Sprintf("%s/%d/%d", typ, h, p)
}

func desired(n plan.NAT) string {
	chainDecl, comments := map[string]string{}, map[string][]string{}
	for _, r := range plan.NFTRules(n) {
		comments[r.Chain] = append(comments[r.Chain], r.Comment())
	}
	for _, c := range chains {
		if len(comments[c.name]) > 0 {
			chainDecl[c.name] = decl(c.typ, c.hook, c.priority)
		}
	}
	return fingerprint(chainDecl, comments)
}

// table is what current reads of a table in the kernel.
type table struct {
	exists      bool
	fingerprint string
	// ours: the owner rule is there, or (a table of an uplinkd from before
	// the owner rule) every rule carries uplinkd's comment with its hash.
	ours bool
}

var legacyComment = regexp.MustCompile(`^uplinkd: .* \[[0-9a-f]{8}\]$`)

// current reads the kernel's table of that name.
func current(c *nftables.Conn, name string) (table, error) {
	var res table
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return res, fmt.Errorf("listing nftables tables: %w", err)
	}
	var t *nftables.Table
	for _, tt := range tables {
		if tt.Name == name {
			t = tt
		}
	}
	if t == nil {
		return res, nil
	}
	res.exists = true
	all, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return res, fmt.Errorf("listing nftables chains: %w", err)
	}
	chainDecl, comments := map[string]string{}, map[string][]string{}
	legacy, rules := true, 0
	for _, ch := range all {
		if ch.Table.Name != name {
			continue
		}
		chainDecl[ch.Name] = decl(ch.Type, ch.Hooknum, ch.Priority)
		rs, err := c.GetRules(t, ch)
		if err != nil {
			return res, fmt.Errorf("listing rules of chain %s: %w", ch.Name, err)
		}
		for _, r := range rs {
			cm, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			comments[ch.Name] = append(comments[ch.Name], cm)
			rules++
			legacy = legacy && legacyComment.MatchString(cm)
			if ch.Name == plan.ChainOwner && cm == plan.OwnerRule.Comment() {
				res.ours = true
			}
		}
	}
	res.ours = res.ours || legacy && rules > 0
	res.fingerprint = fingerprint(chainDecl, comments)
	return res, nil
}

// CheckOwned fails, naming the table, when a table of that name exists
// that uplinkd did not create.
func CheckOwned(c *nftables.Conn, name string) error {
	t, err := current(c, name)
	if err != nil {
		return err
	}
	if t.exists && !t.ours {
		return fmt.Errorf("nftables table inet %s exists and is %w (it has no %q rule): pick another routing.nft_table", name, ErrNotOurs, plan.OwnerWhy)
	}
	return nil
}

// Apply makes uplinkd's table equal to n. It reports whether it changed
// anything.
func Apply(c *nftables.Conn, n plan.NAT) (bool, error) {
	have, err := current(c, n.Table)
	if err != nil {
		return false, err
	}
	if have.exists && !have.ours {
		return false, CheckOwned(c, n.Table)
	}
	if n.Empty() {
		if !have.exists {
			return false, nil
		}
		return true, Remove(c, n.Table)
	}
	if have.exists && have.fingerprint == desired(n) {
		return false, nil
	}
	t := &nftables.Table{Name: n.Table, Family: nftables.TableFamilyINet}
	// add + delete + add in one transaction: the table is replaced
	// atomically whether or not it existed.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	// Every chain before any rule: a jump needs its target to exist.
	rules := plan.NFTRules(n)
	made := map[string]*nftables.Chain{}
	policy := nftables.ChainPolicyAccept
	for _, r := range rules {
		if made[r.Chain] != nil {
			continue
		}
		spec := chainSpecOf(r.Chain)
		ch := &nftables.Chain{Name: spec.name, Table: t, Type: spec.typ, Hooknum: spec.hook, Priority: spec.priority}
		if spec.hook != nil {
			ch.Policy = &policy
		}
		made[r.Chain] = c.AddChain(ch)
	}
	for _, r := range rules {
		c.AddRule(&nftables.Rule{Table: t, Chain: made[r.Chain], Exprs: ruleExprs(r), UserData: userdata.AppendString(nil, userdata.TypeComment, r.Comment())})
	}
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("replacing nftables table inet %s: %w", n.Table, err)
	}
	return true, nil
}

// Remove deletes uplinkd's table if it exists; a table of that name that
// uplinkd did not create is left alone, and named in the error.
func Remove(c *nftables.Conn, table string) error {
	have, err := current(c, table)
	if err != nil || !have.exists {
		return err
	}
	if !have.ours {
		return CheckOwned(c, table)
	}
	c.DelTable(&nftables.Table{Name: table, Family: nftables.TableFamilyINet})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting nftables table inet %s: %w", table, err)
	}
	return nil
}

func chainSpecOf(name string) chainSpec {
	for _, c := range chains {
		if c.name == name {
			return c
		}
	}
	panic("nat: unknown chain " + name)
}

// ruleExprs builds the expressions of one rule from its fields; its
// Text is the same rule in nft syntax (the tests compare both through
// `nft list`).
func ruleExprs(r plan.NFTRule) []expr.Any {
	var e []expr.Any
	if r.Action == plan.NFTSNAT {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		)
	}
	if r.Iif != "" {
		e = append(e, ifMatch(expr.MetaKeyIIFNAME, r.Iif)...)
	}
	if r.Oif != "" {
		e = append(e, ifMatch(expr.MetaKeyOIFNAME, r.Oif)...)
	}
	if r.CtState != "" {
		bits := expr.CtStateBitINVALID
		switch r.CtState {
		case "established,related":
			bits = expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED
		case "new":
			bits = expr.CtStateBitNEW
		}
		e = append(e,
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
		)
	}
	if r.MarkMask != 0 {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(r.MarkMask), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(r.Mark)},
		)
	}
	if r.IPv4 {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		)
	}
	if r.TCP {
		e = append(e,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		)
	}
	if r.TCP && r.NotSYN {
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{tcpSYN}},
		)
	}
	if r.Src.IsValid() {
		mask := net.CIDRMask(r.Src.Bits(), 32)
		e = append(e,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: r.Src.Masked().Addr().AsSlice()},
		)
	}

	e = append(e, &expr.Counter{})
	switch r.Action {
	case plan.NFTMasquerade:
		e = append(e, &expr.Masq{})
	case plan.NFTSNAT:
		e = append(e,
			&expr.Immediate{Register: 1, Data: r.SNATTo.AsSlice()},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1},
		)
	case plan.NFTAccept:
		e = append(e, &expr.Verdict{Kind: expr.VerdictAccept})
	case plan.NFTDrop:
		e = append(e, &expr.Verdict{Kind: expr.VerdictDrop})
	case plan.NFTReset:
		e = append(e, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
	case plan.NFTReturn:
		e = append(e, &expr.Verdict{Kind: expr.VerdictReturn})
	case plan.NFTJumpLANSrc:
		e = append(e, &expr.Verdict{Kind: expr.VerdictJump, Chain: plan.ChainLANSrc})
	}
	return e
}

// TCP header flag bits (byte 13).
const (
	tcpSYN = 0x02
	tcpACK = 0x10
)

func ifMatch(key expr.MetaKey, name string) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

// ProbeReject checks that the kernel takes a TCP reset in a prerouting
// chain (what answers the flows of a dead line): in one transaction it
// creates a table of its own, named table-probe-PID, with that rule behind
// a match that never holds (the transaction fails whole, creating nothing,
// where the kernel refuses the rule or the name is taken), and then
// deletes that table.
func ProbeReject(c *nftables.Conn, table string) error {
	t := &nftables.Table{Name: fmt.Sprintf("%s-probe-%d", table, os.Getpid()), Family: nftables.TableFamilyINet}
	spec := chainSpecOf(plan.ChainPrerouting)
	policy := nftables.ChainPolicyAccept
	c.CreateTable(t)
	ch := c.AddChain(&nftables.Chain{Name: spec.name, Table: t, Type: spec.typ, Hooknum: spec.hook, Priority: spec.priority, Policy: &policy})
	// For the instant the table exists its chain sees every packet: the
	// rule matches none (mark & 0 == 1).
	never := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: make([]byte, 4), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(1)},
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: append(never, ruleExprs(plan.NFTRule{TCP: true, Action: plan.NFTReset})...)})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables reject in a prerouting chain: %w", err)
	}
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("deleting nftables probe table inet %s: %w", t.Name, err)
	}
	return nil
}
