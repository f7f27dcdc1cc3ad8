// SPDX-License-Identifier: Apache-2.0

package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/flows"
	"github.com/uplinkd/uplinkd/loader"
)

func cmdTop(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("top", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its state_dir names the agent, its pin_dir the flow map")
	once := fs.Bool("once", false, "print one frame (after one interval, to measure rates) and exit: no terminal needed")
	interval := fs.Duration("interval", time.Second, "refresh every `duration`")
	nflows := fs.Int("flows", 10, "show the top `n` flows by current rate")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *interval < 100*time.Millisecond || *nflows < 0 || *nflows > 1000 {
		return usageError{errors.New("top: --interval at least 100ms, --flows 0..1000")}
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	v := &topView{stateDir: cfg.StateDir, pinDir: cfg.Datapath.PinDir, nflows: *nflows, width: 100}
	defer v.close()
	if err := v.sample(ctx); err != nil {
		return err
	}
	if *once {
		select {
		case <-time.After(*interval):
		case <-ctx.Done():
			return nil
		}
		if err := v.sample(ctx); err != nil {
			return err
		}
		_, err := io.WriteString(stdout, v.render(time.Now(), "\n"))
		return err
	}
	out, ok := stdout.(*os.File)
	if !ok || !isTerminal(out) || !isTerminal(os.Stdin) {
		return usageError{errors.New("top: needs a terminal (--once prints one frame without)")}
	}
	restore, err := rawMode(os.Stdin)
	if err != nil {
		return fmt.Errorf("top: %w", err)
	}
	defer restore()
	if ws, err := unix.IoctlGetWinsize(int(out.Fd()), unix.TIOCGWINSZ); err == nil && ws.Col >= 60 {
		v.width = int(ws.Col)
	}
	fmt.Fprint(out, "\x1b[?1049h\x1b[?25l") // alternate screen, cursor hidden
	defer fmt.Fprint(out, "\x1b[?25h\x1b[?1049l")
	keys := make(chan byte)
	go func() {
		b := make([]byte, 1)
		for {
			if n, err := os.Stdin.Read(b); err != nil || n == 0 {
				close(keys)
				return
			}
			keys <- b[0]
		}
	}()
	tick := time.NewTicker(*interval)
	defer tick.Stop()
	for {
		fmt.Fprint(out, "\x1b[H\x1b[2J"+v.render(time.Now(), "\r\n")+"\r\nq: quit")
		select {
		case <-ctx.Done():
			return nil
		case k, ok := <-keys:
			if !ok || k == 'q' || k == 'Q' || k == 3 { // 3: Ctrl-C in raw mode
				return nil
			}
		case <-tick.C:
			if err := v.sample(ctx); err != nil {
				v.err = err
			}
		}
	}
}

// topView keeps the last two samples: the agent's status (with line
// rates) and the flows active since the sample before, by key.
type topView struct {
	stateDir, pinDir string
	nflows, width    int
	stats            *loader.Stats
	status           agent.Status
	err              error
	prev             map[flowKey][2]uint64 // bytes tx, rx of the flows active at the last sample
	prevAt           time.Time
	top              []flowRate
}

type flowKey struct{ proto, src, dst string }

type flowRate struct {
	row    flows.Row
	tx, rx float64 // bytes per second
}

func (v *topView) close() {
	if v.stats != nil {
		v.stats.Close()
	}
}

// sample reads the status and the flows. Only flows seen since the last
// sample are kept (bounded by the active flows, not the map's size).
func (v *topView) sample(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := askAgent(rctx, v.stateDir, ctlsock.Request{Cmd: "status"}, &v.status); err != nil {
		return err
	}
	v.err = nil
	if v.stats == nil {
		st, err := loader.OpenStats(v.pinDir)
		if err != nil {
			v.err = err
			return nil
		}
		v.stats = st
	}
	names := flows.Names{Lines: map[int]string{}}
	for _, l := range v.status.Lines {
		names.Lines[l.Number] = l.Name
	}
	for _, r := range v.status.Rules {
		names.Rules = append(names.Rules, r.Name)
	}
	for _, p := range v.status.Policies {
		names.Policies = append(names.Policies, p.Name)
	}
	now := time.Now()
	active := map[flowKey][2]uint64{}
	var rates []flowRate
	first, dt := v.prevAt.IsZero(), now.Sub(v.prevAt).Seconds()
	err := flows.Run(v.stats, flows.Query{}, names, now, func(r flows.Row) error {
		if (first && r.IdleSecs > 2) || (!first && r.IdleSecs > dt+0.5) {
			return nil // idle since the last sample: no rate
		}
		k := flowKey{r.Proto, hostPort(r.Client, r.ClientPort), hostPort(r.Remote, r.RemotePort)}
		active[k] = [2]uint64{r.TxBytes, r.RxBytes}
		p, seen := v.prev[k]
		if first || (!seen && r.AgeSeconds > dt) {
			return nil // its bytes at the last sample are unknown: a rate next time
		}
		fr := flowRate{row: r}
		if r.TxBytes >= p[0] && r.RxBytes >= p[1] {
			fr.tx, fr.rx = float64(r.TxBytes-p[0])/dt, float64(r.RxBytes-p[1])/dt
		}
		rates = append(rates, fr)
		return nil
	})
	if err != nil {
		v.err = err
	}
	slices.SortFunc(rates, func(a, b flowRate) int { return cmp.Compare(b.tx+b.rx, a.tx+a.rx) })
	v.top = rates[:min(len(rates), v.nflows)]
	v.prev, v.prevAt = active, now
	return nil
}

// render draws a frame; nl ends a line ("\r\n" in raw mode).
func (v *topView) render(now time.Time, nl string) string {
	var b strings.Builder
	st := v.status
	fmt.Fprintf(&b, "uplinkd top  %s  %d flows  tx %s rx %s%s", now.Format("15:04:05"), st.Totals.Flows,
		bytesText(st.Totals.TxBytes), bytesText(st.Totals.RxBytes), nl)
	if st.AllLinesDown {
		b.WriteString("ALL LINES DOWN: the last usable lines keep carrying traffic" + nl)
	}
	var peak float64
	for _, l := range st.Lines {
		peak = max(peak, l.TxBytesPerSecond, l.RxBytesPerSecond)
	}
	barWidth := max(10, (v.width-60)/2)
	b.WriteString(nl)
	fmt.Fprintf(&b, "%-8s %-8s %8s %5s %6s  %-*s %10s  %-*s %10s%s", "LINE", "STATE", "RTT", "LOSS", "FLOWS",
		barWidth, "TX", "", barWidth, "RX", "", nl)
	for _, l := range st.Lines {
		state := l.Health
		switch {
		case l.OperatorDown:
			state = "operator"
		case !l.Carrier:
			state = "carrier"
		case !l.Usable && l.Health != "late": // a late line is shown as such
			state = "unusable"
		}
		fmt.Fprintf(&b, "%-8s %-8s %8s %4.0f%% %6d  %s %10s  %s %10s%s", l.Name, state, seconds(l.RTTSeconds), l.LossRatio*100, l.Flows,
			rateBar(l.TxBytesPerSecond, peak, barWidth), bitsText(l.TxBytesPerSecond), rateBar(l.RxBytesPerSecond, peak, barWidth), bitsText(l.RxBytesPerSecond), nl)
	}
	b.WriteString(nl)
	fmt.Fprintf(&b, "%-5s %-45s %-45s %-8s %10s %10s%s", "PROTO", "CLIENT", "REMOTE", "LINE", "TX/s", "RX/s", nl)
	for _, f := range v.top {
		r := f.row
		fmt.Fprintf(&b, "%-5s %-45s %-45s %-8s %10s %10s%s", r.Proto, hostPort(r.Client, r.ClientPort), hostPort(r.Remote, r.RemotePort),
			r.Line, bitsText(f.tx), bitsText(f.rx), nl)
	}
	if v.err != nil {
		fmt.Fprintf(&b, "%serror: %v%s", nl, v.err, nl)
	}
	return b.String()
}

// rateBar is a throughput bar of width characters, full at peak.
func rateBar(v, peak float64, width int) string {
	n := 0
	if peak > 0 {
		n = int(v / peak * float64(width))
	}
	n = min(max(n, 0), width)
	return strings.Repeat("#", n) + strings.Repeat(".", width-n)
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// rawMode puts the terminal in raw mode (keys arrive one at a time,
// unechoed) and returns what restores it.
func rawMode(f *os.File) (func(), error) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Oflag &^= unix.OPOST
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}
